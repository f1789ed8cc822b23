"""Resolving any engine step into the block tables: the general path of :mod:`routecap.store_ingest`.

Shape legend: N rows of one step, L MoE layers, K top-k, P block size.

A step whose segments copy on write, cut into a request's rows, leave gaps, name evicted or
waiting entries, name a request twice, or need blocks that only an eviction can free, is
resolved here, after its rows were checked: plan every segment's blocks, make room once for the
whole step (never evicting a block the step writes or copies), resolve the tables per request
(drawing only from that reservation), then move the rows with one compiled scatter (whole blocks
of a prefill chunk as block copies).
"""

from __future__ import annotations

import numpy as np

from .store_rows import SEG_APPEND, SEG_FAST, fast_runs, scatter_runs
from .store_tables import _GAP, RequestTables, _Request

__all__ = ["resolve_step"]


def resolve_step(t: RequestTables, where: str, ids_NLK: np.ndarray, valid_NL: np.ndarray | None,
                 kind: np.ndarray, slots: np.ndarray, starts: np.ndarray, rows: np.ndarray,
                 ns: np.ndarray, lens: np.ndarray, clock: int) -> None:
    """Store a classified step whose rows were checked (``kind``/``lens`` from
    :func:`~routecap.store_rows.classify_segments`)."""
    pool, P = t.pool, t.block_size
    N = ids_NLK.shape[0]
    S = slots.shape[0]
    slow = np.flatnonzero(kind >= SEG_APPEND)  # appends and the rest: blocks to resolve
    pieces = None
    if slow.size:
        # plan and reserve first (a refusal changes nothing), then resolve tables
        fast_tails = t.tail_b[slots[kind == SEG_FAST]]
        by_slot = t.by_slot
        ai = slow[kind[slow] == SEG_APPEND]
        si = slow[kind[slow] != SEG_APPEND]  # SEG_SLOW and SEG_FRESH
        pieces = _resolve(t, where, [by_slot[i] for i in slots[si].tolist()],
                          starts[si], rows[si], ns[si], lens[si], fast_tails,
                          [by_slot[i] for i in slots[ai].tolist()], starts[ai], rows[ai],
                          ns[ai])
    d = np.empty(S, np.int64)
    s_ = np.empty(S, np.int64)
    c = np.empty(S, np.int64)
    k = fast_runs(kind, slots, starts, rows, ns, t.tail_b, P, t.length, pool.last_use,
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
        has_valid = valid_NL is not None
        valid = valid_NL if has_valid else np.zeros((1, ids_NLK.shape[1]), np.bool_)
        scatter_runs(pool.ids_rows, ids_NLK.reshape(N, -1), pool.valid_rows, valid, has_valid,
                     d[:k], s_[:k], c[:k])


def _resolve(t: RequestTables, where: str, reqs: list[_Request], starts: np.ndarray,
             rows: np.ndarray, ns: np.ndarray, lens: np.ndarray, pinned_fast: np.ndarray,
             app_reqs: list[_Request], app_starts: np.ndarray, app_rows: np.ndarray,
             app_ns: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[np.ndarray, int]]]:
    """Segments that need blocks: plan all, reserve once, then resolve.

    ``app_*``: segments that start a fresh block at their table's end (one block each).
    The rest may copy on write, cut, leave gaps or span blocks.
    """
    pool, P = t.pool, t.block_size
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
