"""Start the ranks of ``routecap capture --nproc N`` through torch's own launcher.

This is ``torchrun`` as a function (:func:`torch.distributed.launcher.api.elastic_launch`): the
rendezvous binds its own port (no free-port guess released before the ranks bind it), a failed
rank stops the others, and ``nnodes`` > 1 spans machines through a rendezvous endpoint, exactly
as ``torchrun --nnodes N --rdzv-endpoint HOST:PORT --rdzv-id ID`` would.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["LaunchError", "Rendezvous", "launch", "main_module_argv"]


class LaunchError(ValueError):
    """The launch options are inconsistent; the message says which and why."""


@dataclass(frozen=True, kw_only=True)
class Rendezvous:
    """How the nodes of a job find each other (one node: a local store on a free port)."""

    nnodes: int = 1
    node_rank: int | None = None  # with a fixed rank per node: torchrun's static rendezvous
    endpoint: str | None = None  # HOST:PORT of the rendezvous store (node 0's for static)
    run_id: str | None = None  # the same on every node

    def check(self) -> None:
        if self.nnodes < 1:
            raise LaunchError(f"--nnodes: expected at least 1, got {self.nnodes}")
        if self.nnodes > 1 and not self.endpoint:
            raise LaunchError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every "
                              "node) so that the nodes can find each other")
        if self.nnodes > 1 and not self.run_id:
            raise LaunchError("--nnodes > 1 needs --rdzv-id ID, the same on every node, so that "
                              "two jobs sharing an endpoint cannot join each other")
        if self.node_rank is not None and not 0 <= self.node_rank < self.nnodes:
            raise LaunchError(f"--node-rank: expected 0 <= rank < {self.nnodes}, got "
                              f"{self.node_rank}")
        if self.endpoint is not None:
            host, _, port = self.endpoint.rpartition(":")
            if not host or not port.isdigit():
                raise LaunchError(f"--rdzv-endpoint: expected HOST:PORT, got {self.endpoint!r}")


def launch(argv: Sequence[str], nproc: int, *, rdzv: Rendezvous | None = None,
           env: dict[str, str] | None = None) -> dict[int, int]:
    """Run the program ``argv`` (``argv[0]`` an executable) as ``nproc`` ranks on this node and
    wait. Returns ``{global rank: exit code}`` of the ranks of this node (0 where it succeeded).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    rdzv = rdzv or Rendezvous()
    rdzv.check()
    if nproc < 1:
        raise LaunchError(f"--nproc: expected at least 1, got {nproc}")
    if rdzv.node_rank is not None:  # torchrun --node-rank R --master-addr H --master-port P
        host, _, port = (rdzv.endpoint or "127.0.0.1:29500").rpartition(":")
        backend, endpoint = "static", f"{host}:{port}"
        configs = {"rank": rdzv.node_rank}
    elif rdzv.nnodes == 1 and rdzv.endpoint is None:  # torchrun --standalone
        backend, endpoint, configs = "c10d", "localhost:0", {}
    else:
        backend, endpoint, configs = "c10d", rdzv.endpoint or "", {}
    import uuid

    config = LaunchConfig(
        min_nodes=rdzv.nnodes, max_nodes=rdzv.nnodes, nproc_per_node=nproc,
        run_id=rdzv.run_id or uuid.uuid4().hex, rdzv_backend=backend, rdzv_endpoint=endpoint,
        rdzv_configs=configs, max_restarts=0, monitor_interval=0.1, start_method="spawn",
    )
    # as torchrun: one OpenMP thread per rank unless told otherwise (ranks share the cores)
    saved = dict(os.environ)
    os.environ.update(env or {})
    if nproc > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        elastic_launch(config, argv[0])(*argv[1:])
    except ChildFailedError as e:
        return {rank: int(f.exitcode) for rank, f in e.failures.items()}
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return {}


def main_module_argv(args: Sequence[str]) -> list[str]:
    """``python -m routecap ARGS`` with this interpreter."""
    return [sys.executable, "-m", "routecap", *args]
