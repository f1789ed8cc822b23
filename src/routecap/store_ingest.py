"""Step ingest of :class:`~routecap.store.RouteStore`: one engine step's rows into the block tables.

Shape legend: N rows of one step, L MoE layers, K top-k, P block size, S segments of the step.

A step is N rows and S segments ``(request, start, first_row, num_rows)``. Storing it:

1. every argument is checked (segments, then the rows they name: ids in ``[0, E)``, K distinct
   ids per valid cell) before anything changes;
2. a compiled pass classifies the segments (:func:`~routecap.store_rows.classify_segments`): a
   row inside the request's private tail block goes straight to the pool, a segment that starts
   a fresh block at its table's end takes one, the rest (copy on write, cuts, gaps, evicted
   blocks, chunks spanning blocks) is resolved per request after one reservation for the step;
3. the rows move with one compiled scatter (whole blocks of a prefill chunk as block copies).
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
    fast_runs,
    first_bad_cell,
    scatter_runs,
    step_fast,
)
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
        """Any step: rows checked first, then one reservation, the tables resolved, a scatter."""
        pool, P = self.pool, self.block_size
        ids_NLK, valid_NL = src.ids, src.valid if src.has_valid else None
        N = ids_NLK.shape[0]
        S = slots.shape[0]
        self.check_cells(where, ids_NLK, valid_NL, rows, ns)
        slow = np.flatnonzero(kind >= SEG_APPEND)  # appends and the rest: blocks to resolve
        pieces = None
        if slow.size:
            # plan and reserve first (a refusal changes nothing), then resolve tables
            fast_tails = self.t.tail_b[slots[kind == SEG_FAST]]
            by_slot = self.t.by_slot
            ai = slow[kind[slow] == SEG_APPEND]
            si = slow[kind[slow] != SEG_APPEND]  # SEG_SLOW and SEG_FRESH
            pieces = self.resolve(where, [by_slot[i] for i in slots[si].tolist()],
                                        starts[si], rows[si], ns[si], lens[si], fast_tails,
                                        [by_slot[i] for i in slots[ai].tolist()], starts[ai],
                                        rows[ai], ns[ai])
        d = np.empty(S, np.int64)
        s_ = np.empty(S, np.int64)
        c = np.empty(S, np.int64)
        k = fast_runs(kind, slots, starts, rows, ns, self.t.tail_b, P, self.t.length, pool.last_use,
                      clock, d, s_, c)
        if pieces is not None:
            d = np.concatenate([d[:k], pieces[0]])
            s_ = np.concatenate([s_[:k], pieces[1]])
            c = np.concatenate([c[:k], pieces[2]])
            k = d.shape[0]
            for bs, r0 in pieces[3]:  # whole blocks from contiguous step rows: block copies
                nb = bs.shape[0]
                pool.ids[bs] = ids_NLK[r0:r0 + nb * P].reshape(nb, P, *ids_NLK.shape[1:])
                pool.valid[bs] = True if valid_NL is None else valid_NL[r0:r0 + nb * P].reshape(
                    nb, P, -1)
        if k:
            step = ids_NLK.reshape(N, -1)
            has_valid = valid_NL is not None
            scatter_runs(pool.ids_rows, step, pool.valid_rows,
                         valid_NL if has_valid else self._no_valid, has_valid, d[:k], s_[:k],
                         c[:k])

    def resolve(self, where: str, reqs: list[_Request], starts: np.ndarray,
                rows: np.ndarray, ns: np.ndarray, lens: np.ndarray,
                pinned_fast: np.ndarray, app_reqs: list[_Request], app_starts: np.ndarray,
                app_rows: np.ndarray, app_ns: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[np.ndarray, int]]]:
        """Segments that need blocks: plan all, reserve once, then resolve.

        ``app_*``: segments that start a fresh block at their table's end (one block each).
        The rest may copy on write, cut, leave gaps or span blocks.
        """
        t, pool, P = self.t, self.pool, self.block_size
        need = 0
        growth: dict[int, int] = {}
        pins: list[int] = []
        repeated = len({r.slot for r in reqs}) != len(reqs)
        for req, start, n, length in zip(reqs, starts.tolist(), ns.tolist(), lens.tolist(),
                                         strict=True):
            end = start + n
            cut = min(start, length)
            j_lo = cut // P
            j_hi = -(-end // P)  # entries [j_lo, j_hi) are written
            growth[req.slot] = max(growth.get(req.slot, 0), j_hi, req.nblocks)
            # entries that survive a cut (start < length): those below ceil(start / P)
            keep = -(-cut // P) if start < length else req.nblocks
            if not n:
                j_hi = j_lo + 1 if start < length and cut % P else j_lo  # the cut's copy only
            for j in range(j_lo, j_hi):
                if j >= keep or j >= req.nblocks:
                    need += 1  # dropped by the cut, or past the table: a fresh block
                    continue
                b = int(req.blocks[j])
                if b >= 0 and pool.gen[b] == req.gens[j]:
                    pins.append(b)
                    if not pool.private(b):
                        need += 1  # copied on write (or to cut inside it)
                else:
                    need += 1
            if repeated:
                need += 1  # bound: a repeated request's later segment may copy once more
        table_growth = sum(t.growth_bytes(r, growth[r.slot]) for r in
                           {r.slot: r for r in reqs}.values())
        pinned = np.unique(np.concatenate([pinned_fast, np.asarray(pins, np.int64)]))
        t.make_room(where, need + len(app_reqs), table_growth, pinned)
        dst: list[int] = []
        src: list[int] = []
        cnt: list[int] = []
        bulk: list[tuple[np.ndarray, int]] = []  # whole blocks: (blocks, first step row)
        try:
            if app_reqs:
                bs = pool.take_many(len(app_reqs))
                gs = pool.gen[bs]
                js = app_starts // P
                for req, b, g, j in zip(app_reqs, bs.tolist(), gs.tolist(), js.tolist()):
                    req.blocks[req.nblocks:j] = _GAP
                    req.blocks[j] = b
                    req.gens[j] = g
                    req.nblocks = j + 1
                slots = np.fromiter((r.slot for r in app_reqs), np.int64, len(app_reqs))
                t.length[slots] = app_starts + app_ns
                open_ = (app_ns < P)
                t.tail_b[slots] = np.where(open_, bs, -1)
                t.tail_g[slots] = gs
                dst.extend((bs * P).tolist())
                src.extend(app_rows.tolist())
                cnt.extend(app_ns.tolist())
            for req, start, row, n, length in zip(reqs, starts.tolist(), rows.tolist(),
                                                  ns.tolist(), lens.tolist(), strict=True):
                t.grow(req, growth[req.slot])
                length = int(t.length[req.slot]) if repeated else length
                if start < length:
                    t.cut(req, start, length)
                    length = start
                elif start > length and length % P:
                    pass  # rows past the length are invalid already: the gap reads missing
                pos, end = start, start + n
                while pos < end:
                    j, off = divmod(pos, P)
                    if not off and j >= req.nblocks and end - pos >= P:
                        # whole fresh blocks past the table (prefill chunks): all at once
                        k = (end - pos) // P
                        bs = pool.take_many(k)
                        req.blocks[req.nblocks:j] = _GAP
                        req.blocks[j:j + k] = bs
                        req.gens[j:j + k] = pool.gen[bs]
                        req.nblocks = j + k
                        bulk.append((bs, row + pos - start))
                        pos += k * P
                        continue
                    m = min(P - off, end - pos)
                    b = t.writable(req, j, length)
                    dst.append(b * P + off)
                    src.append(row + pos - start)
                    cnt.append(m)
                    pos += m
                if n:
                    # entries between the old table end and the first written one are gaps
                    t.length[req.slot] = end
                    t.sync_tail(req, end)
                else:
                    t.length[req.slot] = start
                    t.sync_tail(req, start)
        finally:
            pool.unreserve()
        return (np.asarray(dst, np.int64), np.asarray(src, np.int64), np.asarray(cnt, np.int64),
                bulk)


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
