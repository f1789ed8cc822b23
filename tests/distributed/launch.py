"""Run a test script as W ranks (routecap.launch); raise with every rank's output on failure."""

from __future__ import annotations

import sys
from pathlib import Path

from routecap.launch import launch


def run_ranks(script: Path | str, args: list[str], world: int, *, timeout: float = 300,
              env: dict[str, str] | None = None):
    outs = launch([sys.executable, str(script), *args], world, timeout=timeout, capture=True,
                  env=env)
    if any(o.returncode != 0 for o in outs):
        report = "\n".join(f"--- rank {r} (exit {o.returncode}) ---\n{o.stdout[-3000:]}"
                           for r, o in enumerate(outs))
        raise AssertionError(f"a rank failed:\n{report}")
    return outs
