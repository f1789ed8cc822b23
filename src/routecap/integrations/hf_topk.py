"""The router's own final top-k, intercepted: read the ids it chose, or make it choose given ids.

Shape legend: N router rows (tokens), K top-k, E experts (the width of the router's scores).

Every transformers MoE router ends its choice with one ``torch.topk`` / ``Tensor.topk`` over a
``[N, E]`` score tensor with ``k = K`` (group-limited routers call top-k on ``[N, G, E / G]`` and
``[N, G]`` first: those are not the final selection and are left alone). A :class:`TopkTap`
wraps the callable that holds that call (the router's ``forward``, or a method of the MoE block
for families that choose there) and, for the duration of each call, pushes a
``torch.overrides.TorchFunctionMode`` that catches exactly that top-k:

* **force**: the tap returns ``(scores.gather(-1, ids), ids)`` for given ids instead of the live
  choice. The router's own code then computes the weights from whatever it computes them from
  (the top-k values, or a gather on unmasked scores): routing replay with the architecture's own
  scoring, and gradients reach the router through the gathered scores;
* **read**: hands the ids the router's own top-k produced to readers (capture of routers whose
  output holds no ids: Llama 4, DBRX).

A call of the owner that makes no such top-k call, or more than one, raises
:class:`TopkTapError`: a router the tap does not understand is refused, never silently left to
choose by itself. Several users of one router (a capture and a replay at once) share one tap: the
forced ids are what every reader sees.

NOTE: the mode is active only inside the owner's call (a handful of tensor ops), so its Python
cost is per router call, not per token, and nothing here reads a device value on the host.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "ROUTER_TOPK",
    "TopkReader",
    "TopkScope",
    "TopkTap",
    "TopkTapError",
]

_TOPK = (torch.topk, torch.Tensor.topk)
_SOFTMAX = (torch.softmax, torch.Tensor.softmax, torch.nn.functional.softmax)
_TAP_ATTR = "__routecap_topk_tap__"


class TopkTapError(ValueError):
    """A router's final top-k could not be intercepted (none, or several candidate calls)."""


@dataclass(frozen=True, kw_only=True)
class TopkScope:
    """Where a router family makes its final top-k call.

    ``owner`` is ``"router"`` or ``"block"`` (the MoE block holding the router), ``method`` the
    name of the callable on it whose call contains the top-k (``"forward"`` for a module's forward).
    """

    owner: str = "router"
    method: str = "forward"
    #: "softmax": forced ids read their scores from the call's last ``[N, E]`` softmax instead of
    #: the top-k's input, for routers that top-k a masked copy and use its values as weights
    values_from: str | None = None

    def owner_of(self, router: nn.Module, block: nn.Module) -> nn.Module:
        return router if self.owner == "router" else block


#: The usual place: one top-k in the router's forward, whose input the scores are read from.
ROUTER_TOPK = TopkScope()


def _topk_args(args: tuple, kwargs: dict) -> tuple[Any, Any, Any, Any, Any]:
    """(input, k, dim, largest, sorted) of a torch.topk / Tensor.topk call."""
    names = ("input", "k", "dim", "largest", "sorted")
    defaults = {"dim": -1, "largest": True, "sorted": True}
    vals = dict(zip(names, args))
    for n in names:
        if n not in vals:
            if n == "input" and "self" in kwargs:
                vals[n] = kwargs["self"]
            else:
                vals[n] = kwargs.get(n, defaults.get(n))
    return vals["input"], vals["k"], vals["dim"], vals["largest"], vals["sorted"]


class _FinalTopkMode(TorchFunctionMode):
    """Active for one call of a tap's owner: catches the final top-k and counts the catches."""

    def __init__(self, tap: TopkTap) -> None:
        super().__init__()
        self.tap = tap
        self.caught = 0
        self.source: torch.Tensor | None = None  # the last [N, E] softmax (values_from="softmax")

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.tap.values_from == "softmax" and func in _SOFTMAX:
            out = func(*args, **kwargs)
            if out.dim() == 2 and out.shape[-1] == self.tap.num_experts:
                self.source = out
            return out
        if func in _TOPK and not kwargs.get("out"):
            x, k, dim, largest, _ = _topk_args(args, kwargs)
            tap = self.tap
            if (isinstance(x, torch.Tensor) and x.dim() == 2 and k == tap.top_k
                    and x.shape[-1] == tap.num_experts and dim in (-1, 1) and largest):
                self.caught += 1
                src = self.source if self.source is not None and self.source.shape == x.shape \
                    else x
                return tap._final_topk(func, args, kwargs, x, src)
        return func(*args, **kwargs)


class TopkTap:
    """The final top-k of one router, intercepted for every call of the callable that holds it.

    Use :meth:`attach` (shared per router: a second user gets the same tap) and :meth:`detach`.

    Args:
        owner: the module whose ``method`` holds the router's final top-k call.
        method: ``"forward"`` or the name of a method of ``owner``.
        num_experts: E, the width of the score tensor the final top-k runs over.
        top_k: K.
        name: how errors call this router (its module path and class).
    """

    def __init__(self, owner: nn.Module, method: str, *, num_experts: int, top_k: int,
                 name: str, values_from: str | None = None) -> None:
        self.owner = owner
        self.values_from = values_from
        self.method = method
        self.num_experts = num_experts
        self.top_k = top_k
        self.name = name
        #: ``x_NE -> ids_NK`` (int64, on x's device) or None: the live choice stands
        self.forcer: Callable[[torch.Tensor, Callable[[], torch.Tensor]], torch.Tensor] | None = None
        self.readers: list[Callable[[torch.Tensor], None]] = []
        self._users = 0
        self._had_own: bool = False
        self._own: Any = None

    # ---- sharing ------------------------------------------------------------------------------
    @classmethod
    def attach(cls, owner: nn.Module, method: str, *, num_experts: int, top_k: int,
               name: str, values_from: str | None = None) -> TopkTap:
        """The tap on ``owner.method``, installed now if it is not there yet."""
        current = owner.__dict__.get(method)
        tap = getattr(current, _TAP_ATTR, None)
        if tap is None:
            tap = cls(owner, method, num_experts=num_experts, top_k=top_k, name=name,
                      values_from=values_from)
            tap._install()
        elif (tap.num_experts, tap.top_k) != (num_experts, top_k):
            raise TopkTapError(
                f"{name}: already tapped with (E, K) = {(tap.num_experts, tap.top_k)}, now asked "
                f"for {(num_experts, top_k)}")
        tap._users += 1
        return tap

    def detach(self) -> None:
        """Release one user; the last one restores the owner's callable."""
        self._users -= 1
        if self._users <= 0:
            self._uninstall()

    def _install(self) -> None:
        owner, method = self.owner, self.method
        self._had_own = method in owner.__dict__
        self._own = owner.__dict__.get(method)
        inner = getattr(owner, method)  # bound method (or an earlier instance-level wrapper)

        def tapped(*args: Any, **kwargs: Any) -> Any:
            if self.forcer is None and not self.readers:
                return inner(*args, **kwargs)
            mode = _FinalTopkMode(self)
            with mode:
                out = inner(*args, **kwargs)
            if mode.caught != 1:
                raise TopkTapError(
                    f"{self.name}: its call made {mode.caught} top-k calls over [N, E={self.num_experts}] "
                    f"scores with k={self.top_k}; routecap intercepts the router's one final "
                    "selection and cannot tell which call that is here")
            return out

        setattr(tapped, _TAP_ATTR, self)
        owner.__dict__[method] = tapped  # an instance attribute: shadows the class's callable

    def _uninstall(self) -> None:
        owner, method = self.owner, self.method
        if owner.__dict__.get(method) is None or getattr(owner.__dict__[method], _TAP_ATTR,
                                                          None) is not self:
            return  # somebody else rebound it since: leave theirs in place
        if self._had_own:
            owner.__dict__[method] = self._own
        else:
            del owner.__dict__[method]

    # ---- the catch ----------------------------------------------------------------------------
    def _final_topk(self, func: Any, args: tuple, kwargs: dict, x_NE: torch.Tensor,
                    source_NE: torch.Tensor) -> Any:
        def live() -> torch.Tensor:
            return func(*args, **kwargs)[1]

        if self.forcer is None:
            out = func(*args, **kwargs)
            ids_NK = out[1]
        else:
            ids_NK = self.forcer(x_NE, live)
            # the router's own scores at the given ids: its code turns them into weights
            out = torch.return_types.topk((source_NE.gather(-1, ids_NK), ids_NK))
        for read in self.readers:
            read(ids_NK)
        return out


class TopkReader:
    """Hands the ids of a router's final top-k to ``read(ids_NK)`` on every call, until
    :meth:`remove` (a hook handle, for routers whose output holds no ids: Llama 4, DBRX)."""

    def __init__(self, router: nn.Module, block: nn.Module, scope: TopkScope, *,
                 num_experts: int, top_k: int, name: str,
                 read: Callable[[torch.Tensor], None]) -> None:
        self._tap = TopkTap.attach(scope.owner_of(router, block), scope.method,
                                   num_experts=num_experts, top_k=top_k, name=name,
                                   values_from=scope.values_from)
        self._read = read
        self._tap.readers.append(read)

    def remove(self) -> None:
        if self._tap is not None:
            self._tap.readers.remove(self._read)
            self._tap.detach()
            self._tap = None
