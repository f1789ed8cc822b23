"""Reading a request's routes out of :class:`~routecap.store.RouteStore`'s block tables.

Shape legend: T positions read, L MoE layers, K top-k, P block size.

Two reads, both by absolute position: :func:`coverage_codes` says per position whether its
route is present, evicted, never written or pending on a hash; :func:`gather_rows` copies the
rows out with one gather over the table's blocks (missing cells zeroed and marked). Stale table
entries (their block was evicted and reused) read as missing, never as another request's rows.
"""

from __future__ import annotations

import numpy as np

from .store_tables import _LOST, _WAIT, RequestTables, _Request

__all__ = ["PRESENT", "EVICTED", "NOT_WRITTEN", "PENDING", "coverage_codes", "gather_rows"]

#: :func:`coverage_codes` codes, per position.
PRESENT, EVICTED, NOT_WRITTEN, PENDING = 0, 1, 2, 3


def coverage_codes(t: RequestTables, req: _Request, start: int, end: int) -> np.ndarray:
    """Per position of ``[start, end)``: :data:`PRESENT`, :data:`EVICTED`, :data:`NOT_WRITTEN`
    or :data:`PENDING` (``0 <= start <= end`` checked by the caller)."""
    pool, P = t.pool, t.block_size
    length = int(t.length[req.slot])
    j0, j1 = start // P, -(-end // P)
    slots, alive, raw = t.entries(req, j0, j1)
    code = np.full((j1 - j0, P), NOT_WRITTEN, np.int8)
    present = pool.valid[slots].any(-1) & alive[:, None]
    lost = pool.lost[slots] & alive[:, None]
    code[lost] = EVICTED
    code[present] = PRESENT
    code[(~alive & ((raw >= 0) | (raw == _LOST)))] = EVICTED
    code[raw == _WAIT] = PENDING
    out = code.reshape(-1)[start - j0 * P:end - j0 * P].copy()
    out[max(0, length - start):] = NOT_WRITTEN
    return out


def gather_rows(t: RequestTables, req: _Request, start: int, end: int
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows ``[start, end)`` as ``(ids_TLK, missing_TL or None)``: one gather copy.

    Missing cells (evicted, never written, waiting, past the length) hold id 0. The blocks read
    count as used now (LRU).
    """
    pool, P = t.pool, t.block_size
    L, K = pool.ids.shape[2:]
    length = int(t.length[req.slot])
    T = end - start
    j0, j1 = start // P, -(-end // P)
    slots, alive, _ = t.entries(req, j0, j1)
    pool.last_use[slots[alive]] = pool.tick()
    o = start - j0 * P
    ids = pool.ids[slots].reshape(-1, L, K)[o:o + T]  # the one gather copy
    valid = pool.valid[slots]
    if not alive.all():
        valid &= alive[:, None, None]
    valid = valid.reshape(-1, L)[o:o + T]
    if end > length:
        valid[max(0, length - start):] = False
    missing = None
    if not valid.all():
        missing = ~valid
        ids[missing] = 0
    return ids, missing
