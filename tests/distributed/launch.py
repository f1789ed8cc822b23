"""Run a test script as W ranks through torch's launcher (``python -m torch.distributed.run``,
i.e. torchrun); raise with every rank's output on failure."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path


def run_ranks(script: Path | str, args: list[str], world: int, *, timeout: float = 300,
              env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess]:
    """One CompletedProcess per rank (its stdout+stderr), as torchrun's --redirects wrote them."""
    with tempfile.TemporaryDirectory(prefix="routecap-ranks-") as logs:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", str(world), "--redirects", "3", "--log-dir", logs,
                "--max-restarts", "0", str(script), *args]
        e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=e)
        outs = []
        for rank in range(world):
            text = "".join(p.read_text(errors="replace") for p in
                           sorted(Path(logs).glob(f"**/attempt_0/{rank}/std*.log")))
            outs.append(subprocess.CompletedProcess(argv, r.returncode, text, ""))
    if r.returncode != 0:
        report = "\n".join(f"--- rank {k} ---\n{o.stdout[-3000:]}" for k, o in enumerate(outs))
        raise AssertionError(f"torchrun exited {r.returncode}:\n{r.stderr[-3000:]}\n{report}")
    return outs


#: NCCL for the multi-GPU tests: NVLink multicast (NVLS) off, as the device machines require
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1"}


def transformers_has_ep() -> bool:
    """Whether this transformers has all-to-all expert parallelism (``ep_size``); 5.17 has only
    the TP-style expert parallelism that remaps router outputs."""
    try:
        from transformers.distributed import DistributedConfig

        DistributedConfig(fsdp_size=2, ep_size=2, ep_implementation="all_to_all")
        return True
    except Exception:  # noqa: BLE001 - older transformers: no ep_size
        return False
