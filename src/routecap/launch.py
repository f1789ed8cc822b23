"""Launch N local processes the way torchrun does (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*).

Used by ``routecap capture --nproc N`` and by the multi-process tests. If one rank fails, the
others are stopped (they would otherwise wait forever in a collective).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

__all__ = ["free_port", "launch"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: Sequence[str], nproc: int, *, env: dict[str, str] | None = None,
           timeout: float | None = None, capture: bool = False
           ) -> list[subprocess.CompletedProcess]:
    """Run ``argv`` as ranks 0..nproc-1 and wait. Returns one CompletedProcess per rank.

    ``capture`` collects each rank's stdout+stderr (else they go to this process's streams).
    """
    port = str(free_port())
    procs = []
    for rank in range(nproc):
        e = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                 LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                 PYTHONUNBUFFERED="1", **(env or {}))
        e.setdefault("OMP_NUM_THREADS", "1")
        out = subprocess.PIPE if capture else None
        procs.append(subprocess.Popen(list(argv), env=e, stdout=out,
                                      stderr=subprocess.STDOUT if capture else None, text=True))
    deadline = None if timeout is None else time.monotonic() + timeout
    outputs: list[str] = [""] * nproc
    try:
        pending = set(range(nproc))
        while pending:
            for r in sorted(pending):
                p = procs[r]
                try:
                    out, _ = p.communicate(timeout=0.2)
                except subprocess.TimeoutExpired:
                    continue
                outputs[r] = out or ""
                pending.discard(r)
                if p.returncode != 0:  # a failed rank: the others would hang in a collective
                    for q in procs:
                        if q.poll() is None:
                            q.send_signal(signal.SIGTERM)
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(list(argv), timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [subprocess.CompletedProcess(p.args, p.returncode, outputs[r], "")
            for r, p in enumerate(procs)]


def main_module_argv(args: Sequence[str]) -> list[str]:
    """``python -m routecap ARGS`` with this interpreter."""
    return [sys.executable, "-m", "routecap", *args]
