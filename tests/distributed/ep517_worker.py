"""A rank of transformers 5.17-style expert parallelism (tp_size=W, enable_expert_parallel)."""

import os
import sys

import torch.distributed as dist
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

from routecap.integrations.hf import UnsupportedModelError, find_moe_routers

model = AutoModelForCausalLM.from_pretrained(
    sys.argv[1], distributed_config=DistributedConfig(tp_size=int(os.environ["WORLD_SIZE"]),
                                                      enable_expert_parallel=True))
try:
    find_moe_routers(model)
except UnsupportedModelError as e:
    print("REFUSED:", e)
    code = 0
else:
    print("NOT REFUSED")
    code = 1
dist.barrier()
dist.destroy_process_group()
sys.exit(code)
