"""Host-side route store: rows keyed by request and absolute position, assembled into traces.

Shape legend: T tokens, L MoE layers, K top-k.

The store never guesses. A position that was not written, or whose write was marked invalid, is
returned as missing. Writing at position ``p`` declares that the request's timeline continues from
``p``: every row at or after ``p`` from an earlier write is dropped first (a restarted prefill, a
rejected speculative token, a KV cache that was cropped), so a stale route can never survive.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np

from .trace import id_dtype_for

__all__ = ["RouteStore", "StoreError"]


class StoreError(KeyError, ValueError):
    """A call the store cannot honour (unknown request, bad positions, shape change)."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


@dataclass
class _Rows:
    ids_TLK: np.ndarray
    valid_TL: np.ndarray
    length: int = 0  # one past the highest position written


class RouteStore:
    """Rows of many requests, keyed by (request, absolute position).

    Example:
        >>> import numpy as np
        >>> s = RouteStore(num_layers=1, top_k=2, num_experts=8)
        >>> s.write("a", 0, np.array([[[1, 2]], [[3, 4]]], np.uint8))
        >>> ids, missing = s.take("a", 1)
        >>> ids.tolist(), missing
        ([[[3, 4]]], None)
    """

    def __init__(self, *, num_layers: int, top_k: int, num_experts: int, initial_rows: int = 64):
        self.num_layers = num_layers
        self.top_k = top_k
        self.num_experts = num_experts
        self.dtype = id_dtype_for(num_experts)
        self._initial = max(1, initial_rows)
        self._rows: dict[Hashable, _Rows] = {}

    def __contains__(self, request: Hashable) -> bool:
        return request in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def requests(self) -> list[Hashable]:
        return list(self._rows)

    def length(self, request: Hashable) -> int:
        """One past the highest position written for ``request``."""
        return self._get(request).length

    @property
    def nbytes(self) -> int:
        return sum(r.ids_TLK.nbytes + r.valid_TL.nbytes for r in self._rows.values())

    def _get(self, request: Hashable) -> _Rows:
        try:
            return self._rows[request]
        except KeyError:
            raise StoreError(f"unknown request {request!r}; the store holds {len(self._rows)} "
                             "requests") from None

    def write(
        self,
        request: Hashable,
        start: int,
        ids_TLK: np.ndarray,
        valid_TL: np.ndarray | None = None,
    ) -> None:
        """Store rows for positions ``[start, start + T)``; drops any row at or after ``start``."""
        L, K = self.num_layers, self.top_k
        if ids_TLK.ndim != 3 or ids_TLK.shape[1:] != (L, K):
            raise StoreError(
                f"write({request!r}): expected rows of shape [T, L={L}, K={K}], got "
                f"{tuple(ids_TLK.shape)}"
            )
        if ids_TLK.dtype != self.dtype:
            raise StoreError(f"write({request!r}): expected dtype {self.dtype}, got {ids_TLK.dtype}")
        if start < 0:
            raise StoreError(f"write({request!r}): expected start >= 0, got {start}")
        T = ids_TLK.shape[0]
        if valid_TL is not None and valid_TL.shape != (T, L):
            raise StoreError(
                f"write({request!r}): expected valid mask of shape {(T, L)}, got {valid_TL.shape}"
            )
        rows = self._rows.get(request)
        end = start + T
        if rows is None:
            cap = max(self._initial, end)
            rows = _Rows(np.zeros((cap, L, K), self.dtype), np.zeros((cap, L), np.bool_))
            self._rows[request] = rows
        elif end > rows.ids_TLK.shape[0]:
            cap = max(end, 2 * rows.ids_TLK.shape[0])
            ids = np.zeros((cap, L, K), self.dtype)
            valid = np.zeros((cap, L), np.bool_)
            ids[: rows.length] = rows.ids_TLK[: rows.length]
            valid[: rows.length] = rows.valid_TL[: rows.length]
            rows.ids_TLK, rows.valid_TL = ids, valid
        if start < rows.length:
            rows.valid_TL[start : rows.length] = False  # the timeline restarts at `start`
        elif start > rows.length:
            rows.valid_TL[rows.length : start] = False  # a gap: never written, so missing
        rows.ids_TLK[start:end] = ids_TLK
        if valid_TL is None:
            rows.valid_TL[start:end] = True
        else:
            rows.valid_TL[start:end] = valid_TL
        rows.length = end

    def truncate(self, request: Hashable, length: int) -> None:
        """Forget every position at or after ``length``."""
        rows = self._get(request)
        if length < 0:
            raise StoreError(f"truncate({request!r}): expected length >= 0, got {length}")
        if length < rows.length:
            rows.valid_TL[length : rows.length] = False
            rows.length = length

    def take(
        self, request: Hashable, start: int = 0, end: int | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows of positions ``[start, end)`` (one copy) and their missing mask (None if complete).

        Positions past the last one written are missing.
        """
        rows = self._get(request)
        end = rows.length if end is None else end
        if not 0 <= start <= end:
            raise StoreError(f"take({request!r}): expected 0 <= start <= end, got {start}, {end}")
        T = end - start
        have = max(0, min(end, rows.length) - start)
        ids = np.zeros((T, self.num_layers, self.top_k), self.dtype)
        valid = np.zeros((T, self.num_layers), np.bool_)
        if have:
            ids[:have] = rows.ids_TLK[start : start + have]
            valid[:have] = rows.valid_TL[start : start + have]
        missing = ~valid
        if missing.any():
            ids[missing] = 0
            return ids, missing
        return ids, None

    def free(self, request: Hashable) -> None:
        """Drop every row of ``request``."""
        self._get(request)
        del self._rows[request]

    def clear(self) -> None:
        self._rows.clear()
