"""Start the ranks of ``routecap capture --nproc N`` through torch's own launcher.

This is ``torchrun`` as a function (:func:`torch.distributed.launcher.api.elastic_launch`): the
rendezvous binds its own port (no free-port guess released before the ranks bind it), a failed
rank stops the others, and ``nnodes`` > 1 spans machines through a rendezvous endpoint, exactly
as ``torchrun --nnodes N --rdzv-endpoint HOST:PORT --rdzv-id ID`` would.

A rank is either a command (``argv``: a fresh interpreter per rank, as torchrun runs a script) or
a Python function. Function ranks start from a fork server that has imported torch, transformers
and routecap once (:data:`PRELOAD`): N ranks then cost one import instead of N, and a process that
launches many times (a test session, a driver) pays it once in all. The server imports but never
initialises CUDA, so forked ranks may use it.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["PRELOAD", "LaunchError", "RankFailure", "Rendezvous", "cli_rank", "launch"]

# what the fork server imports before it forks function ranks (a module that fails to import is
# skipped there and imported by the rank itself)
PRELOAD = ("torch", "torch.distributed", "transformers", "transformers.modeling_utils",
           "transformers.generation", "routecap.cli", "routecap.capture_job",
           "routecap.integrations.hf")


class LaunchError(ValueError):
    """The launch options are inconsistent; the message says which and why."""


@dataclass(frozen=True, kw_only=True)
class RankFailure:
    """How a rank ended when it did not end well."""

    exitcode: int  # negative: killed by that signal
    message: str  # the exception a function rank raised ("ValueError: ..."), or torch's words


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


def launch(entry: Sequence[str] | Callable[..., Any], nproc: int, *, args: Sequence[Any] = (),
           rdzv: Rendezvous | None = None, env: dict[str, str] | None = None,
           log_dir: str | None = None,
           preload: Sequence[str] = PRELOAD) -> dict[int, RankFailure]:
    """Run ``entry`` as ``nproc`` ranks on this node and wait: a command (``argv[0]`` an
    executable, the rest its arguments) or a picklable module-level function called as
    ``entry(*args)`` in each rank (forked from the preloading server; the rank's exit code is
    that of a ``SystemExit`` it raises, else 0). With ``log_dir``, each rank's stdout and stderr
    go to files below it (torchrun's ``--redirects 3 --log-dir``). Returns ``{global rank: exit
    code and message}`` of the ranks that failed (empty: all exited 0).
    """
    rdzv = rdzv or Rendezvous()
    rdzv.check()
    if nproc < 1:
        raise LaunchError(f"--nproc: expected at least 1, got {nproc}")
    saved = dict(os.environ)  # the launch's environment changes end with it
    try:
        return _launch(entry, nproc, args=args, rdzv=rdzv, env=env, log_dir=log_dir,
                       preload=preload)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _launch(entry, nproc: int, *, args, rdzv: Rendezvous, env, log_dir,
            preload) -> dict[int, RankFailure]:
    # NOTE: the launcher's own loggers read LOGLEVEL when first made; a failed rank has said
    # what went wrong in one line, so the agent's warnings (closing signals, failure tables)
    # stay quiet unless the user asks for them
    quiet = "LOGLEVEL" not in os.environ
    os.environ.setdefault("LOGLEVEL", "ERROR")
    import uuid

    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    levels = _quiet_loggers() if quiet else {}
    if rdzv.node_rank is not None:  # torchrun --node-rank R --master-addr H --master-port P
        host, _, port = (rdzv.endpoint or "127.0.0.1:29500").rpartition(":")
        backend, endpoint = "static", f"{host}:{port}"
        configs = {"rank": rdzv.node_rank}
    elif rdzv.nnodes == 1 and rdzv.endpoint is None:  # torchrun --standalone
        backend, endpoint, configs = "c10d", "localhost:0", {}
    else:
        backend, endpoint, configs = "c10d", rdzv.endpoint or "", {}
    logs = DefaultLogsSpecs(log_dir=log_dir, redirects=Std.ALL) if log_dir else None
    config = LaunchConfig(
        min_nodes=rdzv.nnodes, max_nodes=rdzv.nnodes, nproc_per_node=nproc,
        run_id=rdzv.run_id or uuid.uuid4().hex, rdzv_backend=backend, rdzv_endpoint=endpoint,
        rdzv_configs=configs, max_restarts=0, monitor_interval=0.1, start_method="forkserver",
        **({"logs_specs": logs} if logs else {}),
    )
    if callable(entry):
        # the server is made once per process: the list counts only before the first launch
        multiprocessing.set_forkserver_preload(list(preload))
        target, argv = entry, tuple(args)
    else:
        target, argv = entry[0], (*entry[1:], *args)
    # as torchrun: one OpenMP thread per rank unless told otherwise (ranks share the cores)
    os.environ.update(env or {})
    if nproc > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        elastic_launch(config, target)(*argv)
    except ChildFailedError as e:
        return {rank: RankFailure(exitcode=int(f.exitcode), message=str(f.message))
                for rank, f in e.failures.items()}
    finally:
        for logger, level in levels.items():
            logger.setLevel(level)
    return {}


def _quiet_loggers() -> dict[Any, int]:
    """Silence, for one launch, what torch's process context logs when a function rank fails (a
    traceback, and a warning per peer it stops): the rank has said what went wrong already.
    Returns the loggers' levels before."""
    import logging

    levels = {}
    for name in ("torch.distributed.elastic", "torch.multiprocessing"):
        for logger_name in [name, *(n for n in logging.root.manager.loggerDict
                                    if n.startswith(name + "."))]:
            logger = logging.getLogger(logger_name)
            levels[logger] = logger.level
            logger.setLevel(logging.CRITICAL)
    return levels


def cli_rank(command: str, params: dict[str, Any]) -> None:
    """One rank of a ``routecap`` command: the command's function called with the values the
    launching process parsed and converted. Its ``typer.Exit`` / ``SystemExit`` becomes the
    rank's exit code."""
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:  # the fork server's torch was imported before the launcher set it
        import torch

        torch.set_num_threads(int(threads))
    import typer

    from . import cli

    try:
        getattr(cli, command)(**params)
    except typer.Exit as e:
        if e.exit_code:
            sys.exit(e.exit_code)
