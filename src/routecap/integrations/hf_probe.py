"""Learn what a transformers router returns by running its MoE block once on dummy rows.

Shape legend: N router rows, K top-k, E experts.

:func:`probe_router` runs a MoE block (or, failing that, its router alone) on 3 zero rows and
finds which element of the router's output holds the ``[N, K]`` integer ids it chose and how wide
its logits are (the ids it can choose); for routers whose output holds no ids it checks that the
final top-k call can be read (:mod:`.hf_topk`). :func:`remapped_by` tells whether a parallel style
has replaced the router's forward with one that rewrites its ids. Both serve
:func:`routecap.integrations.hf_routers.find_moe_routers`, which refuses what they find wanting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .hf_topk import TopkReader, TopkScope

__all__ = ["Probe", "ProbeError", "probe_router", "remapped_by"]


class ProbeError(ValueError):
    """The router cannot be run, or its output holds no single id tensor (the message names the
    architecture, the router and what came)."""


@dataclass(frozen=True)
class Probe:
    slot: int  # which output element holds the ids
    num_experts: int  # ids the router can produce: [0, num_experts)


def _describe(outs: Sequence[Any]) -> str:
    return ", ".join(
        f"{type(o).__name__}{tuple(o.shape) if isinstance(o, torch.Tensor) else ''}"
        f"{'/' + str(o.dtype) if isinstance(o, torch.Tensor) else ''}" for o in outs)


def _run_once(block: nn.Module, router: nn.Module, x: torch.Tensor
              ) -> tuple[list[Any], list[Exception]]:
    """Run the block on ``x`` (or, failing that, the router on its rows) recording the router's
    own output, whatever other hooks do to it."""
    recorded: list[Any] = []
    errors: list[Exception] = []
    original = router.__dict__.get("forward")
    bound = router.forward

    def recording_forward(*args: Any, **kwargs: Any) -> Any:
        out = bound(*args, **kwargs)
        recorded.append(out)
        return out

    router.forward = recording_forward
    try:
        with torch.no_grad():
            try:  # the block supplies whatever else its router needs
                block(x)
            except Exception as e:  # noqa: BLE001 - fall back to the router alone
                errors.append(e)
                recorded.clear()
                try:
                    recording_forward(x[0])
                except Exception as e2:  # noqa: BLE001
                    errors.append(e2)
    finally:
        if original is None:
            del router.forward
        else:
            router.forward = original
    return recorded, errors


def _probe_topk(site_path: str, block: nn.Module, router: nn.Module, scope: TopkScope,
                top_k: int, num_experts: int, x: torch.Tensor, arch: str) -> None:
    """For a router read at its final top-k: one block run must hand over one [3, K] ids."""
    got: list[torch.Tensor] = []
    reader = TopkReader(router, block, scope, num_experts=num_experts, top_k=top_k,
                        name=f"{arch}: router {type(router).__name__} at {site_path}",
                        read=got.append)
    try:
        with torch.no_grad():
            block(x)
    except Exception as e:  # noqa: BLE001 - named below
        raise ProbeError(
            f"{arch}: router {type(router).__name__} at {site_path}: its block cannot be run on "
            f"dummy hidden states with its final top-k read ({type(e).__name__}: {e})") from e
    finally:
        reader.remove()
    if len(got) != 1 or tuple(got[0].shape) != (3, top_k):
        raise ProbeError(
            f"{arch}: router {type(router).__name__} at {site_path}: expected one final top-k of "
            f"[3, {top_k}] ids over 3 dummy rows, got {[tuple(g.shape) for g in got]}")


def probe_router(site_path: str, block: nn.Module, router: nn.Module, top_k: int,
                 num_experts: int, hidden: int | None, arch: str, *,
                 topk_scope: TopkScope | None = None) -> Probe:
    """Run the MoE block (or, failing that, its router) on 3 dummy rows and look at what the
    router returns: which output slot holds the [N, K] integer ids, and how wide its logits are.
    With ``topk_scope`` (a router whose output holds no ids) check instead that its final top-k
    call hands over one ``[3, K]`` ids (``slot`` -1).
    """
    cls = type(router).__name__
    params = list(router.parameters())
    ref = params[0] if params else None
    sharded = any(type(p).__name__ == "DTensor" for p in params)
    if ref is None or ref.device.type == "meta" or hidden is None or sharded:
        # cannot probe (weights not materialised, or sharded at rest as under FSDP, where they
        # are all-gathered only inside the forward): capture() checks the output at run time
        return Probe(slot=2, num_experts=num_experts)
    x = torch.zeros(1, 3, hidden, dtype=ref.dtype, device=ref.device)
    if topk_scope is not None:  # no ids in the output: read at the final top-k
        _probe_topk(site_path, block, router, topk_scope, top_k, num_experts, x, arch)
        return Probe(slot=-1, num_experts=num_experts)
    recorded, errors = _run_once(block, router, x)
    if not recorded:
        e = errors[-1]
        raise ProbeError(
            f"{arch}: router {cls} at {site_path} cannot be run on dummy hidden states "
            f"({type(e).__name__}: {e}); routecap supports routers returning "
            "(router_logits, router_scores, router_indices)"
        ) from e
    out = recorded[0]
    outs = out if isinstance(out, (tuple, list)) else (out,)
    slots = [
        i for i, o in enumerate(outs)
        if isinstance(o, torch.Tensor) and not o.is_floating_point() and o.dtype != torch.bool
        and o.dim() >= 1 and o.shape[-1] == top_k and o.numel() == 3 * top_k
    ]
    if len(slots) != 1:
        raise ProbeError(
            f"{arch}: router {cls} at {site_path} returned ({_describe(outs)}); routecap expects "
            f"exactly one integer tensor of shape [N, top_k={top_k}] (the chosen expert ids) in "
            "its output"
        )
    # routers with extra "zero-computation" experts (LongCat-Flash) choose ids past the routed
    # experts: their logits say how many ids there are
    first = outs[0]
    width = num_experts
    if isinstance(first, torch.Tensor) and first.is_floating_point() and first.numel() % 3 == 0 \
            and first.shape[-1] * 3 == first.numel():
        width = max(num_experts, int(first.shape[-1]))
    return Probe(slot=slots[0], num_experts=width)


def remapped_by(router: nn.Module) -> str | None:
    """The name of a parallel style that rewrites the router's outputs, if one is installed.

    transformers 5.17's expert parallelism (``enable_expert_parallel``) replaces the router's
    ``forward`` with a wrapper (``EpRouterParallel``) that turns the chosen global expert ids into
    this rank's local ids, with a sentinel for experts on other ranks. A hook then sees local ids,
    which are not the routes: such routers are refused rather than recorded wrongly.
    """
    fwd = router.__dict__.get("forward")
    for cell in getattr(fwd, "__closure__", None) or ():
        try:
            obj = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        for cls in type(obj).__mro__:
            if cls.__name__ in ("EpRouterParallel", "RouterParallel"):
                return type(obj).__name__
    return None
