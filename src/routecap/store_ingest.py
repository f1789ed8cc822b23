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
from typing import Any

import numpy as np

from .block_pool import BlockPool
from .store_rows import (
    SEG_APPEND,
    SEG_FAST,
    SEG_SLOW,
    classify_segments,
    fast_runs,
    first_bad_cell,
    scatter_runs,
)
from .store_tables import _GAP, RequestTables, StoreError, _Request, is_int

__all__ = ["StepIngest"]


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
        try:
            keys, starts_l, rows_l, ns_l = zip(*segments) if len(segments) else ((), (), (), ())
            slots = np.array(list(map(self.t.slot_of.__getitem__, keys)), np.int64)
        except (KeyError, TypeError, ValueError):
            for seg in segments:
                if not isinstance(seg, (tuple, list)) or len(seg) != 4:
                    raise StoreError(f"{where}: expected segments of (request, start, first_row, "
                                     f"num_rows), got {seg!r}") from None
                self.t.get(seg[0])
            raise StoreError(f"{where}: bad segments {segments!r}") from None
        starts = _int_array(where, "start", starts_l)
        rows = _int_array(where, "first_row", rows_l)
        ns = _int_array(where, "num_rows", ns_l)
        self.store_step(where, ids_NLK, valid_NL, slots, starts, rows, ns, seek)

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
            arrs.append(a.astype(np.int64, copy=False))
        h, st, rw, ns = arrs
        slots = h & 0xFFFFFFFF
        ok = slots < self.t.length.shape[0]
        ok[ok] = (h[ok] >> 32 == self.t.serial[slots[ok]]) & self.t.live[slots[ok]]
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise StoreError(f"{where}: handle {int(h[i])} (segment {i}) names no request: the "
                             "request was freed, or the handle is not from handle()")
        self.store_step(where, ids_NLK, valid_NL, slots, st, rw, ns, seek)

    # ---- the step -------------------------------------------------------------------------------
    def store_step(self, where: str, ids_NLK: np.ndarray, valid_NL: np.ndarray | None,
                   slots: np.ndarray, starts: np.ndarray, rows: np.ndarray, ns: np.ndarray,
                   seek: bool) -> None:
        N = ids_NLK.shape[0]
        S = slots.shape[0]
        pool, P = self.pool, self.block_size
        kind = np.empty(S, np.int8)
        lens = np.empty(S, np.int64)
        if self.t.mark.shape[0] != self.t.length.shape[0]:
            self.t.mark = np.full(self.t.length.shape[0], -1, np.int64)
        bad = classify_segments(slots, starts, rows, ns, N, self.t.length, self.t.tail_b,
                                self.t.tail_g, self.t.cap, pool.gen, pool.refs, pool.published,
                                P, seek, kind, lens, self.t.mark)
        if bad >= 0:
            i, code = divmod(bad, 4)
            keys = [self.t.by_slot[int(slots[i])].key] * (i + 1)
            if code == 1:
                raise StoreError(f"{where}: segment of {keys[i]!r} names rows [{int(rows[i])}, "
                                 f"{int(rows[i] + ns[i])}) of a step of {N} rows")
            if code == 2:
                raise StoreError(f"{where}: segment of {keys[i]!r} starts at position "
                                 f"{int(starts[i])}; expected >= 0")
            _raise_position(where, keys[i], int(lens[i]), int(starts[i]))
        self.check_cells(where, ids_NLK, valid_NL, rows, ns)
        clock = pool.tick()
        slow = np.flatnonzero(kind >= SEG_APPEND)  # appends and the rest: blocks to resolve
        pieces = None
        if slow.size:
            # plan and reserve first (a refusal changes nothing), then resolve tables
            fast_tails = self.t.tail_b[slots[kind == SEG_FAST]]
            by_slot = self.t.by_slot
            ai = slow[kind[slow] == SEG_APPEND]
            si = slow[kind[slow] == SEG_SLOW]
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
