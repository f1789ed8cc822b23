"""One decoder forward of ``generate`` as the transformers binding sees it: its shape and offset.

Shape legend: B batch rows, S tokens per row in one forward.

A forward over ``[B, S]`` writes each batch row's routes at KV cache columns ``[c, c + S)``, where
``c`` is the cache length before the forward. :func:`step_shape` reads ``(B, S)`` from the
forward's inputs; :func:`cache_length` reads ``c`` from the cache without a device sync (a static
cache keeps it on the device: it is copied to pinned host memory asynchronously, and
:class:`StepTag` reads it only once the step's copy has completed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["StepTag", "cache_length", "step_shape"]


@dataclass(frozen=True, kw_only=True)
class StepTag:
    batch: int  # B
    seq: int  # S
    # KV cache length before the forward (the column of s = 0): an int, or a one-element host
    # tensor the device fills asynchronously (static caches keep their length on the device)
    offset_or_host: Any

    @property
    def offset(self) -> int:
        # NOTE: read only when the step reaches the host, after its copy event completed
        return int(self.offset_or_host)


def step_shape(args: tuple, kwargs: dict) -> tuple[int, int] | None:
    x = kwargs.get("input_ids")
    if x is None and args and isinstance(args[0], torch.Tensor):
        x = args[0]
    if isinstance(x, torch.Tensor):
        return (int(x.shape[0]), int(x.shape[1])) if x.dim() == 2 else (1, int(x.shape[0]))
    e = kwargs.get("inputs_embeds")
    if isinstance(e, torch.Tensor):
        return (int(e.shape[0]), int(e.shape[1])) if e.dim() == 3 else (1, int(e.shape[0]))
    return None


def cache_length(kwargs: dict) -> Any:
    """The cache's length before the forward: an int, or a host tensor filled asynchronously."""
    cache = kwargs.get("cache", None)
    if cache is None:
        cache = kwargs.get("past_key_values", None)
    if cache is None:
        return 0
    get = getattr(cache, "get_seq_length", None)
    if get is None:
        raise TypeError(
            f"routecap: cannot read the length of a {type(cache).__name__} cache; expected a "
            "transformers Cache with get_seq_length()"
        )
    n = get()
    if isinstance(n, torch.Tensor):
        # NOTE: a StaticCache keeps its length in a device tensor: copy it to the host without
        # waiting; the step's copy event (recorded after this) says when it has arrived
        if n.device.type == "cpu":
            return n.clone()
        host = torch.empty((), dtype=n.dtype, pin_memory=True)
        host.copy_(n, non_blocking=True)
        return host
    return int(n)
