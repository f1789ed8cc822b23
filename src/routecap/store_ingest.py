"""Step ingest of :class:`~routecap.store.RouteStore`: one engine step's rows into the block tables.

Shape legend: N rows of one step, L MoE layers, K top-k, P block size, S segments of the step.

A step is N rows and S segments ``(request, start, first_row, num_rows)``. Every argument is
checked (segments, then the rows they name: ids in ``[0, E)``, K distinct ids per valid cell)
before the call's effects are kept: a refused step leaves every request as it was. Three paths,
chosen per step by a compiled classification of its segments
(:func:`~routecap.store_rows.classify_segments`):

1. every segment writes inside its request's private tail block (a decode step, but one in P):
   one compiled call (:func:`~routecap.store_rows.step_fast`) maps request handles to slots,
   classifies, checks each row and copies it into the pool, and commits the lengths;
2. the rest start fresh blocks at their tables' ends (a decode step at a block boundary, prefill
   chunks) and those fit without an eviction: the blocks are taken (Python per request: an
   event), the rows are checked as they are copied (:func:`~routecap.store_rows.copy_check_runs`)
   and a bad row gives the blocks back;
3. anything else (copy on write, cuts, gaps, evicted blocks, a request named twice, a step that
   must evict): the rows are checked first, room is reserved once for the step, the tables are
   resolved per request, and the rows move with one compiled scatter.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import numpy as np

from .block_pool import BlockPool
from .store_rows import (
    _HAVE_NUMBA,
    SEG_APPEND,
    SEG_FAST,
    SEG_FRESH,
    SEG_SLOW,
    STEP_EVENTS,
    STEP_STORED,
    copy_check_runs,
    first_bad_cell,
    step_fast,
)
from .store_resolve import resolve_step
from .store_tables import _GAP, RequestTables, StoreError, _Request, is_int

__all__ = ["StepIngest"]

_NO_PINS = np.zeros(0, np.int64)


class _StepRows(NamedTuple):  # (not a dataclass: built on every step, and cheap as a tuple)
    """The step's rows as the kernels read them (C-contiguous views of the same bytes)."""

    ids: np.ndarray  # [N, L, K]
    cells: np.ndarray  # [N * L, K]
    words: np.ndarray  # [N * L] uint64 (8 one-byte ids per cell), or a dummy [1]
    valid: np.ndarray  # [N, L], or a dummy [1, L] when has_valid is False
    has_valid: bool


class StepIngest:
    """Writes engine steps into :class:`RequestTables` over their :class:`BlockPool`."""

    def __init__(self, tables: RequestTables, *, num_experts: int, num_layers: int, top_k: int,
                 dtype: np.dtype) -> None:
        self.t = tables
        self.pool: BlockPool = tables.pool
        self.block_size = tables.block_size
        self.num_experts, self.num_layers, self.top_k = num_experts, num_layers, top_k
        self.dtype = dtype
        self._no_valid = np.zeros((1, num_layers), np.bool_)
        self._no_words = np.zeros(1, np.uint64)
        # the row check reads 8 one-byte ids as one word when the range test fits (see store_rows)
        self.swar = bool(_HAVE_NUMBA and dtype == np.uint8 and top_k == 8
                         and (num_experts <= 128 or num_experts >= 256))

    # ---- arguments ------------------------------------------------------------------------------
    def check_rows(self, where: str, ids_NLK: Any, valid_NL: Any) -> None:
        L, K = self.num_layers, self.top_k
        if not isinstance(ids_NLK, np.ndarray) or ids_NLK.ndim != 3 or ids_NLK.shape[1:] != (L, K):
            raise StoreError(f"{where}: expected rows of shape [T, L={L}, K={K}], got "
                             f"{getattr(ids_NLK, 'shape', type(ids_NLK).__name__)}")
        if ids_NLK.dtype != self.dtype:
            raise StoreError(f"{where}: expected dtype {self.dtype}, got {ids_NLK.dtype}")
        if valid_NL is not None and (not isinstance(valid_NL, np.ndarray)
                                     or valid_NL.shape != ids_NLK.shape[:2]
                                     or valid_NL.dtype != np.bool_):
            raise StoreError(f"{where}: expected a bool valid mask of shape {ids_NLK.shape[:2]}, "
                             f"got {getattr(valid_NL, 'dtype', type(valid_NL).__name__)} "
                             f"{getattr(valid_NL, 'shape', '')}")

    def check_cells(self, where: str, ids_NLK: np.ndarray, valid_NL: np.ndarray | None,
                    rows: np.ndarray, ns: np.ndarray) -> None:
        bad = first_bad_cell(ids_NLK, valid_NL, rows, ns, self.num_experts)
        if bad < 0:
            return
        row, layer = divmod(bad, self.num_layers)
        _raise_bad_cell(where, ids_NLK[row, layer], row, layer, self.num_experts, self.top_k)

    # ---- entry points ---------------------------------------------------------------------------
    def ingest(self, where: str, ids_NLK: np.ndarray, valid_NL: np.ndarray | None,
               segments: Sequence[tuple[Hashable, int, int, int]], seek: bool) -> None:
        """Segments as tuples (see :meth:`routecap.store.RouteStore.ingest`)."""
        self.check_rows(where, ids_NLK, valid_NL)
        try:  # request id -> slot, once per segment
            keys, starts_l, rows_l, ns_l = zip(*segments) if len(segments) else ((), (), (), ())
            slots = list(map(self.t.slot_of.__getitem__, keys))
        except (KeyError, TypeError, ValueError):
            for seg in segments:
                if not isinstance(seg, (tuple, list)) or len(seg) != 4:
                    raise StoreError(f"{where}: expected segments of (request, start, first_row, "
                                     f"num_rows), got {seg!r}") from None
                self.t.get(seg[0])
            raise StoreError(f"{where}: bad segments {segments!r}") from None
        if set(map(type, starts_l)) | set(map(type, rows_l)) | set(map(type, ns_l)) <= {int}:
            try:  # the common case: one conversion, without numpy's type inference
                seg = np.array((slots, starts_l, rows_l, ns_l), np.int64).reshape(4, -1)
            except OverflowError:
                raise StoreError(f"{where}: a segment field does not fit in int64") from None
        else:
            seg = np.stack([np.array(slots, np.int64).reshape(-1),
                            _int_array(where, "start", starts_l),
                            _int_array(where, "first_row", rows_l),
                            _int_array(where, "num_rows", ns_l)]).reshape(4, -1)
        self.store_step(where, ids_NLK, valid_NL, seg[0], False, seg[1], seg[2], seg[3], seek)

    def handle(self, req: _Request) -> int:
        return int(self.t.serial[req.slot]) << 32 | req.slot

    def ingest_arrays(self, ids_NLK: np.ndarray, valid_NL: np.ndarray | None,
                      handles: np.ndarray, starts: np.ndarray, first_rows: np.ndarray,
                      num_rows: np.ndarray, seek: bool) -> None:
        """Segments as integer arrays (see :meth:`routecap.store.RouteStore.ingest_arrays`)."""
        where = "ingest_arrays"
        self.check_rows(where, ids_NLK, valid_NL)
        arrs = []
        for name, a in (("handles", handles), ("starts", starts), ("first_rows", first_rows),
                        ("num_rows", num_rows)):
            if (not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype.kind not in "iu"
                    or a.shape != np.shape(handles)):
                raise StoreError(f"{where}: expected {name} to be a 1-D integer array of "
                                 f"{np.shape(handles)} entries, got "
                                 f"{getattr(a, 'dtype', type(a).__name__)} {np.shape(a)}")
            arrs.append(np.ascontiguousarray(a, np.int64))
        h, st, rw, ns = arrs
        self.store_step(where, ids_NLK, valid_NL, h, True, st, rw, ns, seek)

    # ---- the step -------------------------------------------------------------------------------
    def store_step(self, where: str, ids_NLK: np.ndarray, valid_NL: np.ndarray | None,
                   handles: np.ndarray, from_handles: bool, starts: np.ndarray, rows: np.ndarray,
                   ns: np.ndarray, seek: bool) -> None:
        """Store one step: one compiled call unless a segment needs an event (a new block...)."""
        t, pool, P = self.t, self.pool, self.block_size
        N, L, K = ids_NLK.shape
        S = handles.shape[0]
        ids = np.ascontiguousarray(ids_NLK)
        has_valid = valid_NL is not None
        valid = np.ascontiguousarray(valid_NL) if has_valid else self._no_valid
        src = _StepRows(ids=ids, cells=ids.reshape(N * L, K),
                        words=ids.reshape(-1).view(np.uint64) if self.swar else self._no_words,
                        valid=valid, has_valid=has_valid)
        scratch = np.empty((5, S), np.int64)
        slots, lens, d, s, n = scratch
        kind = np.empty(S, np.int8)
        clock = pool.tick()
        r = step_fast(handles, from_handles, t.serial, t.live, slots, starts, rows, ns, seek,
                      t.length, t.tail_b, t.tail_g, t.cap, pool.gen, pool.refs, pool.published, P,
                      kind, lens, t.mark, pool.ids_cells, src.cells, src.words, self.swar,
                      pool.valid_rows, valid, has_valid, self.num_experts, pool.last_use, clock,
                      d, s, n)
        if r == STEP_STORED:
            return
        if r >= 0:
            self._raise_segment(where, r, handles, slots, starts, rows, ns, lens, N)
        if r != STEP_EVENTS:
            self._raise_cell(where, ids, -3 - r)
        if not (kind == SEG_SLOW).any() and self._store_fresh(where, src, kind, slots, starts,
                                                               rows, ns, clock):
            return
        self._store_general(where, src, kind, slots, starts, rows, ns, lens, clock)

    def _raise_segment(self, where: str, r: int, handles: np.ndarray, slots: np.ndarray,
                       starts: np.ndarray, rows: np.ndarray, ns: np.ndarray, lens: np.ndarray,
                       N: int) -> None:
        i, code = divmod(r, 4)
        if code == 0:
            raise StoreError(f"{where}: handle {int(handles[i])} (segment {i}) names no request: "
                             "the request was freed, or the handle is not from handle()")
        key = self.t.by_slot[int(slots[i])].key
        if code == 1:
            raise StoreError(f"{where}: segment of {key!r} names rows [{int(rows[i])}, "
                             f"{int(rows[i] + ns[i])}) of a step of {N} rows")
        if code == 2:
            raise StoreError(f"{where}: segment of {key!r} starts at position "
                             f"{int(starts[i])}; expected >= 0")
        _raise_position(where, key, int(lens[i]), int(starts[i]))

    def _raise_cell(self, where: str, ids_NLK: np.ndarray, cell: int) -> None:
        row, layer = divmod(cell, self.num_layers)
        _raise_bad_cell(where, ids_NLK[row, layer], row, layer, self.num_experts, self.top_k)

    def _store_fresh(self, where: str, src: _StepRows, kind: np.ndarray, slots: np.ndarray,
                     starts: np.ndarray, rows: np.ndarray, ns: np.ndarray, clock: int) -> bool:
        """Segments in private tail blocks and fresh blocks at their tables' ends (no cut, no copy
        on write), when their blocks fit without an eviction: rows checked as they are copied,
        a refusal gives the fresh blocks back. Returns False (nothing changed) if they do not fit.
        """
        t, pool, P = self.t, self.pool, self.block_size
        fi = np.flatnonzero(kind >= SEG_APPEND)  # SEG_APPEND or SEG_FRESH: fresh blocks
        nblk = -(-ns[fi] // P)
        need = int(nblk.sum())
        j0 = starts[fi] // P
        j1 = j0 + nblk
        by_slot = t.by_slot
        reqs = [by_slot[x] for x in slots[fi].tolist()]
        growth = 0
        if (kind == SEG_FRESH).any():  # SEG_APPEND fits its table by definition
            growth = sum(t.growth_bytes(q, e) for q, e in zip(reqs, j1.tolist(), strict=True))
        if not t.fits_without_eviction(need, growth):
            return False
        t.make_room(where, need, growth, _NO_PINS)  # evicts nothing (checked above)
        try:
            bs = pool.take_many(need, clear_valid=False)
        finally:
            pool.unreserve()
        first = np.cumsum(nblk) - nblk
        last = bs[first + nblk - 1]
        # the copy marks the rows it writes; the rest of a partly written last block is invalid
        pool.valid[last[ns[fi] % P != 0]] = False
        fa = np.flatnonzero(kind == SEG_FAST)
        fs = slots[fa]
        fb = t.tail_b[fs]
        seg = np.repeat(np.arange(fi.size), nblk)
        k = np.arange(need) - first[seg]
        d = np.concatenate([fb * P + starts[fa] % P, bs * P])
        s = np.concatenate([rows[fa], rows[fi][seg] + k * P])
        n = np.concatenate([ns[fa], np.minimum(P, ns[fi][seg] - k * P)])
        bad = copy_check_runs(pool.ids_cells, src.cells, src.words, self.swar, pool.valid_rows,
                              src.valid, src.has_valid, d, s, n, self.num_experts)
        if bad >= 0:
            pool.untake(bs)
            t.table_bytes -= growth
            pool.limit = t.limit_for(t.table_bytes)
            self._raise_cell(where, src.ids, bad)
        end = starts[fa] + ns[fa]
        t.length[fs] = end
        t.tail_b[fs] = np.where(end % P == 0, -1, fb)
        pool.last_use[fb] = clock
        # the new blocks into the tables: Python per request, on this event only
        sl = slots[fi]
        end = starts[fi] + ns[fi]
        t.length[sl] = end
        t.tail_b[sl] = np.where(end % P == 0, -1, last)
        t.tail_g[sl] = pool.gen[last]
        gens = pool.gen[bs]
        for req, a, b, f in zip(reqs, j0.tolist(), j1.tolist(), first.tolist(), strict=True):
            t.grow(req, b)
            req.blocks[req.nblocks:a] = _GAP
            req.blocks[a:b] = bs[f:f + b - a]
            req.gens[a:b] = gens[f:f + b - a]
            req.nblocks = b
        return True

    def _store_general(self, where: str, src: _StepRows, kind: np.ndarray, slots: np.ndarray,
                       starts: np.ndarray, rows: np.ndarray, ns: np.ndarray, lens: np.ndarray,
                       clock: int) -> None:
        """Any step: rows checked first, then :func:`~routecap.store_resolve.resolve_step`."""
        valid_NL = src.valid if src.has_valid else None
        self.check_cells(where, src.ids, valid_NL, rows, ns)
        resolve_step(self.t, where, src.ids, valid_NL, kind, slots, starts, rows, ns, lens, clock)


def _raise_bad_cell(where: str, ids: np.ndarray, row: int, layer: int, E: int, K: int) -> None:
    if int(ids.max()) >= E:
        raise StoreError(f"{where}: expected expert ids in [0, {E}), got {ids.tolist()} at step "
                         f"row {row}, layer {layer}")
    raise StoreError(f"{where}: expected {K} distinct expert ids in each row, got "
                     f"{ids.tolist()} at step row {row}, layer {layer} (mark the cell invalid if "
                     "the router did not produce it)")


def _int_array(where: str, name: str, values: Sequence[Any]) -> np.ndarray:
    if set(map(type, values)) <= {int}:  # the common case, without numpy's type inference
        return np.fromiter(values, np.int64, len(values))
    arr = np.asarray(values)
    if arr.size and (arr.dtype.kind not in "iu" or arr.ndim != 1):
        bad = next((v for v in values if not is_int(v)), values[0])
        raise StoreError(f"{where}: expected {name} of every segment to be an int, got {bad!r}")
    return arr.astype(np.int64, copy=False).reshape(-1) if arr.size else np.zeros(0, np.int64)


def _raise_position(where: str, request: Hashable, length: int, start: int) -> None:
    if start < length:
        raise StoreError(
            f"{where}: positions going backwards: the write starts at {start} but request "
            f"{request!r} already has {length} positions; call truncate({request!r}, "
            f"{start}) first to drop rejected rows, restart() after a preemption, or pass "
            "seek=True")
    raise StoreError(f"{where}: a gap: the write starts at {start} but request {request!r} has "
                     f"{length} positions (expected {length}, or pass seek=True)")
