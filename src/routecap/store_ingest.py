"""Step ingest of :class:`~routecap.store.RouteStore`: one engine step's rows into the block tables.

Shape legend: N rows of one step, L MoE layers, K top-k, P block size, S segments of the step.

A step is N rows and S segments ``(request, start, first_row, num_rows)``. Every argument is
checked (segments, then the rows they name: ids in ``[0, E)``, K distinct ids per valid cell)
before the call's effects are kept: a refused step leaves every request as it was. Three paths,
chosen per step by a compiled classification of its segments
(:func:`~routecap.store_rows.classify_segments`):

1. every segment writes inside its request's private tail block (a decode step, but one in P),
   or starts new blocks at its table's end (a decode step at a block boundary, prefill chunks)
   that fit without an eviction: one compiled call (:func:`~routecap.store_step.step_fast`)
   maps request handles to slots, classifies, takes the new blocks from the top of the free
   stack, checks each row as it copies it into the pool, and commits the lengths, the blocks'
   state and the new table entries (a table that grows past its capacity moves to the end of
   the tables' slab); Python then accounts for the blocks taken (and the tables' bytes);
2. the same when the slab has no room left for it (an event): the tables' growth counted,
   :func:`~routecap.store_step.fresh_step` again, then the tables grown (the slab packed) and
   their entries written;
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
    SEG_SLOW,
    first_bad_cell,
)
from .store_step import (
    BUDGET_BLOCK_BYTES,
    BUDGET_BLOCKS,
    BUDGET_IN_USE,
    BUDGET_SLAB_END,
    BUDGET_SLAB_SIZE,
    BUDGET_TABLE_BYTES,
    FRESH_FULL,
    FRESH_GROW,
    STEP_BAD_CELL,
    STEP_EVENTS,
    STEP_FRESH,
    STEP_STORED,
    fresh_step,
    step_fast,
)
from .store_resolve import resolve_step
from .store_tables import _ENTRY_BYTES, _GAP, RequestTables, StoreError, _Request, is_int

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
        self._scratch = np.empty((5, 256), np.int64)  # slots, lens, runs: step_fast's output
        self._fresh_out = np.empty((5, 256), np.int64)  # fresh_step's plan
        self._budget = np.zeros(6, np.int64)  # fresh_step's budget (store_step.BUDGET_*)
        self._budget[BUDGET_BLOCK_BYTES] = tables.block_bytes
        self._budget[BUDGET_BLOCKS] = self.pool.num_blocks
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
        shape = getattr(handles, "shape", None)
        # NOTE: the common case (four C-contiguous int64 vectors) is tested without converting:
        # this call runs once per engine step, and each conversion costs about a microsecond
        if not (len(shape or ()) == 1 and _is_i64_vector(handles, shape)
                and _is_i64_vector(starts, shape) and _is_i64_vector(first_rows, shape)
                and _is_i64_vector(num_rows, shape)):
            handles, starts, first_rows, num_rows = _segment_arrays(
                where, handles, starts, first_rows, num_rows)
        self.store_step(where, ids_NLK, valid_NL, handles, True, starts, first_rows, num_rows,
                        seek)

    # ---- the step -------------------------------------------------------------------------------
    def store_step(self, where: str, ids_NLK: np.ndarray, valid_NL: np.ndarray | None,
                   handles: np.ndarray, from_handles: bool, starts: np.ndarray, rows: np.ndarray,
                   ns: np.ndarray, seek: bool) -> None:
        """Store one step: one compiled call unless a table grows, a block is evicted, or a
        segment needs more than a private tail block or new blocks at its table's end."""
        t, pool, P = self.t, self.pool, self.block_size
        N, L, K = ids_NLK.shape
        S = handles.shape[0]
        ids = np.ascontiguousarray(ids_NLK)
        has_valid = valid_NL is not None
        valid = np.ascontiguousarray(valid_NL) if has_valid else self._no_valid
        cells = ids.reshape(N * L, K)
        # (frombuffer: the cheapest uint64 view of the contiguous ids, one word per cell)
        words = np.frombuffer(ids, np.uint64) if self.swar else self._no_words
        if S > self._scratch.shape[1]:
            self._scratch = np.empty((5, 2 * S), np.int64)
        if S > self._fresh_out.shape[1]:
            self._fresh_out = np.empty((5, 2 * S), np.int64)
        kind = np.empty(S, np.int8)
        clock = pool.tick()
        free, nfree = pool.free_stack
        self._fill_budget()
        r = step_fast(handles, from_handles, t.slot_state, starts, rows, ns, seek, pool.gen_use,
                      pool.refs, pool.published, P, self._scratch, kind, pool.ids_cells,
                      cells, words, self.swar, pool.valid_rows, valid, has_valid,
                      self.num_experts, clock, free, nfree, self._budget, pool.in_use_mask,
                      pool.lost, self._fresh_out, t.slab.entries)
        if r == STEP_STORED:
            return
        if r == STEP_FRESH:  # (blocks marked taken and table entries written by the kernel)
            self._took(int(self._scratch[2, 0]), int(self._scratch[3, 0]))
            return
        src = _StepRows(ids, cells, words, valid, has_valid)
        slots, lens = self._scratch[:2, :S].copy()  # (the scratch is reused by the next step)
        if r >= 0:
            self._raise_segment(where, r, handles, slots, starts, rows, ns, lens, N)
        if r != STEP_EVENTS:
            self._raise_cell(where, ids, STEP_BAD_CELL - r)
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
        """A step of private tail blocks and new blocks at the tables' ends that the compiled
        step left as an event (the tables' slab is full), when the blocks fit without an
        eviction: the tables' growth counted, then :func:`~routecap.store_step.fresh_step`, then
        the tables grown and their new entries. Returns False (nothing changed) if the blocks
        do not fit.
        """
        t, pool = self.t, self.pool
        out = self._fresh_out
        code, nf, need = self._fresh_call(src, kind, slots, starts, rows, ns, clock, False)
        if code == -1:
            self._took(nf, need)
            return True
        growth = 0
        if code == FRESH_GROW:  # bytes first
            growth = sum(t.growth_bytes(t.by_slot[sl], j1) for sl, j1 in
                         zip(out[0, :nf].tolist(), out[2, :nf].tolist(), strict=True))
            if not t.fits_without_eviction(need, growth):
                return False
            t.make_room(where, 0, growth, _NO_PINS)  # evicts nothing (checked)
            code, nf, need = self._fresh_call(src, kind, slots, starts, rows, ns, clock, True)
        if code != -1:
            if growth:  # the table bytes back
                t.table_bytes -= growth
                pool.limit = t.limit_for(t.table_bytes)
            if code == FRESH_FULL:
                return False
            self._raise_cell(where, src.ids, code)
        bs = pool.took_top(need)
        gens = pool.gen[bs]
        for sl, a, b, f in zip(*out[:4, :nf].tolist(), strict=True):
            req = t.by_slot[sl]
            t.grow(req, b)
            if req.nblocks < a:
                req.blocks[req.nblocks:a] = _GAP
            req.blocks[a:b] = bs[f:f + b - a]
            req.gens[a:b] = gens[f:f + b - a]
            req.nblocks = b
        return True

    def _fill_budget(self) -> None:
        # (scalar stores: this runs on every step; block bytes and pool blocks never change)
        t, b = self.t, self._budget
        b[BUDGET_TABLE_BYTES] = t.table_bytes
        b[BUDGET_IN_USE] = self.pool.in_use
        b[BUDGET_SLAB_END] = t.slab.end
        b[BUDGET_SLAB_SIZE] = t.slab.entries.shape[1]

    def _took(self, nf: int, need: int) -> None:
        """After :func:`~routecap.store_step.fresh_step` stored a step (tables and entries
        included): the blocks it took off the free stack, the tables it grew."""
        t = self.t
        self.pool.took_top(need)
        table_bytes = int(self._budget[BUDGET_TABLE_BYTES])
        if table_bytes != t.table_bytes:  # tables grew (an event): their bytes, their views
            t.slab.moved(t, self._fresh_out[0, :nf][self._fresh_out[4, :nf] > 0].tolist(),
                         int(self._budget[BUDGET_SLAB_END]), (table_bytes - t.table_bytes)
                         // _ENTRY_BYTES)
            t.table_bytes = table_bytes
            self.pool.limit = t.limit_for(table_bytes)

    def _fresh_call(self, src: _StepRows, kind: np.ndarray, slots: np.ndarray,
                    starts: np.ndarray, rows: np.ndarray, ns: np.ndarray, clock: int,
                    grow_ok: bool) -> tuple[int, int, int]:
        pool = self.pool
        free, nfree = pool.free_stack
        self._fill_budget()
        return fresh_step(kind, slots, starts, rows, ns, self.block_size, self.t.slot_state, free,
                          nfree, self._budget, grow_ok, pool.refs, pool.in_use_mask, pool.lost,
                          pool.gen_use, clock, pool.ids_cells, src.cells, src.words, self.swar,
                          pool.valid_rows, src.valid, src.has_valid, self.num_experts,
                          self._fresh_out, self.t.slab.entries)

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


_I64 = np.dtype(np.int64)


def _is_i64_vector(a: Any, shape: tuple[int, ...]) -> bool:
    return type(a) is np.ndarray and a.dtype is _I64 and a.shape == shape and a.flags.c_contiguous


def _segment_arrays(where: str, *arrays: Any) -> list[np.ndarray]:
    """The segment arrays of :meth:`StepIngest.ingest_arrays` as C-contiguous int64 vectors."""
    out = []
    shape = np.shape(arrays[0])
    for name, a in zip(("handles", "starts", "first_rows", "num_rows"), arrays, strict=True):
        if (not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype.kind not in "iu"
                or a.shape != shape):
            raise StoreError(f"{where}: expected {name} to be a 1-D integer array of "
                             f"{shape} entries, got {getattr(a, 'dtype', type(a).__name__)} "
                             f"{np.shape(a)}")
        out.append(np.ascontiguousarray(a, np.int64))
    return out
