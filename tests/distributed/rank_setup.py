"""The start of every rank of a multi-process test (the rank side of ``launch.run_ranks``): who
this rank is, its device, its process group, and a model under transformers' expert parallelism."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def rank_device(device: str) -> tuple[int, int, str]:
    """(rank, world size, device) from torchrun's environment: ``device`` "cpu", or "cuda" for
    the GPU of this rank's LOCAL_RANK (one GPU a rank, made the current one)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device == "cpu":
        return rank, world, "cpu"
    if device != "cuda":
        raise ValueError(f"--device: expected cpu or cuda, got {device!r}")
    local = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(local)
    return rank, world, f"cuda:{local}"


def init_group(device: str) -> None:
    """The default process group: NCCL for a GPU rank, gloo on the CPU."""
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")


def load_ep_model(path: str, world: int, **kwargs: Any) -> Any:
    """The model saved at ``path``, loaded by transformers with all-to-all expert parallelism over
    ``world`` ranks (transformers starts the process group itself)."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    dc = DistributedConfig(fsdp_size=world, ep_size=world, ep_implementation="all_to_all")
    return AutoModelForCausalLM.from_pretrained(path, distributed_config=dc, **kwargs)
