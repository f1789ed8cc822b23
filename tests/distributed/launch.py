"""Launch W processes of a script the way torchrun does (RANK, WORLD_SIZE, MASTER_*), on CPU."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script: Path | str, args: list[str], world: int, *, timeout: float = 240,
              extra_env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess]:
    """Run ``python script args`` as ranks 0..world-1; raise with every rank's output on failure."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(extra_env or {}))
        procs.append(subprocess.Popen([sys.executable, str(script), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outs.append(subprocess.CompletedProcess(p.args, p.returncode, out, ""))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(o.returncode != 0 for o in outs):
        report = "\n".join(f"--- rank {r} (exit {o.returncode}) ---\n{o.stdout[-3000:]}"
                           for r, o in enumerate(outs))
        raise AssertionError(f"a rank failed:\n{report}")
    return outs
