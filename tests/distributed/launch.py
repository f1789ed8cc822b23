"""Run a test script as W ranks through torch's launcher (routecap.launch: torchrun as a function);
raise with every rank's output on failure.

The ranks are forked from the launcher's fork server, which imported torch, transformers, routecap
and the test helpers once for the whole test session: a scenario then costs what its ranks do,
not W fresh imports of torch and transformers. Each rank is still a process of its own (a fresh
fork of the server, never of an earlier rank) that runs the script as ``__main__``.
"""

from __future__ import annotations

import runpy
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from routecap.launch import PRELOAD, launch

# the scripts' own imports: tests/ is on the server's path (it copies this process's sys.path)
PRELOAD_TESTS = (*PRELOAD, "tiny_models", "routecap.files", "routecap.replay",
                 "torch.distributed.fsdp")


def run_script(script: str, args: list[str]) -> None:
    """One rank: ``python SCRIPT ARGS`` inside the forked process."""
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


def run_ranks(script: Path | str, args: list[str], world: int, *, timeout: float = 300,
              env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess]:
    """One CompletedProcess per rank (its stdout+stderr, as the launcher's redirects wrote them).
    After ``timeout`` seconds the launcher stops the ranks and this raises TimeoutError."""
    env = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}

    def expire(signum, frame):
        raise TimeoutError(f"{script}: {world} ranks still running after {timeout:.0f} s")

    # the launcher's agent runs in this thread: an exception there makes it stop the ranks
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        with tempfile.TemporaryDirectory(prefix="routecap-ranks-") as logs:
            failed = launch(run_script, world, args=(str(script), [str(a) for a in args]),
                            env=env, log_dir=logs, preload=PRELOAD_TESTS)
            outs = _outputs(Path(logs), script, args, world, failed)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if failed:
        report = "\n".join(f"--- rank {k} ---\n{o.stdout[-3000:]}" for k, o in enumerate(outs))
        raise AssertionError(f"ranks failed with exit codes {failed}:\n{report}")
    return outs


def _outputs(logs: Path, script, args, world: int, failed: dict[int, int]):
    outs = []
    for rank in range(world):
        text = "".join(p.read_text(errors="replace") for p in
                       sorted(logs.glob(f"**/attempt_0/{rank}/std*.log")))
        outs.append(subprocess.CompletedProcess([str(script), *args], failed.get(rank, 0), text,
                                                ""))
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
