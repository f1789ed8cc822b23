"""Serving-grade host route store: request block tables over a :class:`~routecap.block_pool.BlockPool`.

Shape legend: T tokens, L MoE layers, K top-k, N rows of one step, P block size (tokens per block).

A serving engine does not run one request per forward: rows of many requests share a step, long
prompts arrive in chunks, cached prefixes skip the forward, requests are preempted and recomputed,
speculative tokens are computed and rejected. The store mirrors the engine's KV cache:

* Routes live in a preallocated pool of blocks ``[num_blocks, P, L, K]`` (plus a validity mask)
  sized by a byte budget that covers the pool *and* the per-request block tables: the store never
  holds more than ``budget_bytes`` (:attr:`RouteStore.nbytes`).
* Each request has a block table: entry j holds positions ``[j*P, (j+1)*P)``. Partial blocks are
  the request's own; a full block is *published* under the content hash the engine gives it, so a
  later request whose prefix hits the engine's cache gets those routes without a forward
  (:meth:`RouteStore.add_request` with ``num_cached_tokens``).
* Writing into a shared block copies it first (copy-on-write); publishing a block whose hash is
  already known links to the existing block (deduplication).
* When the pool is full, the least recently used block is evicted, unreferenced published blocks
  before blocks in use. Routes of an evicted block come back *missing*, never wrong: every table
  entry carries the block's generation, and a reused block has a new one.

Block hashes must be *chained content hashes*: the hash of block j covers the tokens of blocks
0..j (as vLLM's and SGLang's prefix-cache hashes do), so equal hashes mean equal prefixes and
therefore equal routes. The store shares blocks on the hash alone and cannot check a hash
against tokens it never sees; what it can detect, it does: a hash published twice with rows that
disagree is counted in :attr:`RouteStore.hash_conflicts` (each request then keeps its own rows),
or raises with ``strict_hashes=True``.

The ordering contract of one engine step (what vLLM v1 does): (1) :meth:`add_request` /
:meth:`restart` for the requests scheduled in this step, with the hashes of their prefix-cache
hits; (2) :meth:`ingest` of the step's rows; (3) :meth:`publish` of the full blocks. An engine
marks a block cached as soon as it is *scheduled*, so a request admitted in the same step (a
group of ``n > 1`` samples of one prompt, duplicate prompts) can hit blocks whose rows arrive only
in that step's ingest, or in a later step's (chunked prefill). Such an entry *waits* on its hash
(coverage :data:`PENDING`) and is linked when the hash is published, whoever publishes it.

Positions move forward: :meth:`write`/:meth:`ingest` continue at the request's length; rejected
speculative rows are dropped with :meth:`truncate`, a preempted and rescheduled request starts
again with :meth:`restart`. With ``seek=True`` a write may start anywhere: before the length (the
request's later positions are dropped first, as when a KV cache was cropped) or after it (the
positions in between read as missing, never written). Every call checks all of its arguments,
and that the budget can hold what it needs, before changing anything: a refused call leaves every
request as it was. Every refusal is a :class:`StoreError`.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from .block_pool import BlockPool
from .store_tables import _LOST, _REQUEST_BYTES, _WAIT, RequestTables, StoreError
from .store_rows import (
    SEG_APPEND,
    SEG_FAST,
    SEG_SLOW,
    classify_segments,
    fast_runs,
    first_bad_cell,
    scatter_runs,
)
from .trace import RoutingTrace, id_dtype_for

__all__ = ["PRESENT", "EVICTED", "NOT_WRITTEN", "PENDING", "RouteStore", "StoreError"]

#: :meth:`RouteStore.coverage` codes, per position.
PRESENT, EVICTED, NOT_WRITTEN, PENDING = 0, 1, 2, 3
_BLOCK_BOOKKEEPING = 128  # per block beyond ids/mask/lost: generation, refs, clock, flags, hash index


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


class RouteStore:
    """Routes of many requests, by (request, absolute position), within a byte budget.

    Args:
        num_experts, moe_layers, top_k: the model's router shape (L = len(moe_layers)).
        block_size: tokens per block (use the engine's KV block size so hashes line up).
        budget_bytes: the most the store may hold: blocks (ids, masks, bookkeeping) and block
            tables (:data:`_REQUEST_BYTES` per request plus 16 bytes per table slot).
        model: recorded in the traces :meth:`take` returns.
        strict_hashes: raise when a hash is published twice with rows that disagree (instead of
            counting it in :attr:`hash_conflicts`).

    Example:
        >>> import numpy as np
        >>> s = RouteStore(num_experts=8, moe_layers=[0], top_k=2, block_size=2)
        >>> cached = s.add_request("a", prompt_len=3)
        >>> s.write("a", 0, np.array([[[1, 2]], [[3, 4]], [[5, 6]]], np.uint8))
        >>> t = s.take("a", start=1)
        >>> t.expert_ids.tolist(), t.start, t.missing
        ([[[3, 4]], [[5, 6]]], 1, None)
    """

    def __init__(self, *, num_experts: int, moe_layers: Sequence[int], top_k: int,
                 block_size: int = 16, budget_bytes: int = 256 << 20, model: str = "",
                 strict_hashes: bool = False) -> None:
        for name, v in (("num_experts", num_experts), ("top_k", top_k),
                        ("block_size", block_size), ("budget_bytes", budget_bytes)):
            if not _is_int(v) or v < 1:
                raise StoreError(f"RouteStore: expected {name} to be an int >= 1, got {v!r}")
        try:
            self.moe_layers = tuple(int(x) for x in moe_layers)
        except (TypeError, ValueError):
            raise StoreError(f"RouteStore: expected moe_layers to be a sequence of ints, got "
                             f"{moe_layers!r}") from None
        self.num_experts = int(num_experts)
        self.num_layers = L = len(self.moe_layers)
        self.top_k = K = int(top_k)
        self.model = model
        self.strict_hashes = bool(strict_hashes)
        self.dtype = id_dtype_for(self.num_experts)
        if L < 1:
            raise StoreError("RouteStore: expected at least one MoE layer, got moe_layers=()")
        self.block_size = P = int(block_size)
        self.block_bytes = P * L * K * self.dtype.itemsize + P * L + P + _BLOCK_BOOKKEEPING
        num_blocks = int(budget_bytes) // self.block_bytes
        if num_blocks < 1:
            raise StoreError(f"RouteStore: a budget of {budget_bytes} bytes holds no block; one "
                             f"block of {P} tokens x {L} layers x top-{K} needs "
                             f"{self.block_bytes} bytes")
        self.budget_bytes = int(budget_bytes)
        self.num_blocks = num_blocks
        self.pool = BlockPool(num_blocks=num_blocks, block_size=P, num_layers=L, top_k=K,
                              dtype=self.dtype)
        self.t = RequestTables(self.pool, block_bytes=self.block_bytes,
                               budget_bytes=self.budget_bytes)
        self._no_valid = np.zeros((1, L), np.bool_)
        self.hash_conflicts = 0

    # ---- introspection ------------------------------------------------------------------------
    def __contains__(self, request: Hashable) -> bool:
        try:
            return request in self.t.reqs
        except TypeError:
            return False

    def __len__(self) -> int:
        return len(self.t.reqs)

    def requests(self) -> list[Hashable]:
        return list(self.t.reqs)

    def length(self, request: Hashable) -> int:
        """Positions covered so far (the next write starts here)."""
        return int(self.t.length[self.t.get(request).slot])

    @property
    def evictions(self) -> int:
        return self.pool.evictions

    @property
    def blocks_in_use(self) -> int:
        return self.pool.in_use

    @property
    def table_bytes(self) -> int:
        """Bytes the request block tables account for (see ``budget_bytes``)."""
        return self.t.table_bytes

    @property
    def nbytes(self) -> int:
        """Bytes held: blocks in use plus block tables; never more than ``budget_bytes``."""
        return self.pool.in_use * self.block_bytes + self.t.table_bytes

    @property
    def reserved_bytes(self) -> int:
        """Bytes the full pool accounts for (the most the store can ever hold)."""
        return self.num_blocks * self.block_bytes

    # ---- budget: block tables share it with the pool ---------------------------------------------
    # ---- requests -----------------------------------------------------------------------------
    def add_request(self, request: Hashable, *, prompt_len: int, num_cached_tokens: int = 0,
                    block_hashes: Sequence[Hashable] = ()) -> int:
        """Start a request whose first ``num_cached_tokens`` positions hit the engine's prefix cache.

        ``block_hashes`` are the chained content hashes of those cached full blocks (at least
        ``num_cached_tokens // block_size`` of them). Returns how many of the cached positions
        the store has routes for now; a hit on a hash not published yet waits for it
        (:data:`PENDING`), one on a block the store evicted is missing (:data:`EVICTED`).
        """
        where = f"add_request({request!r})"
        try:
            exists = request in self.t.reqs
        except TypeError:
            raise StoreError(f"{where}: request ids must be hashable, got "
                             f"{type(request).__name__}") from None
        if exists:
            raise StoreError(f"{where}: the request already exists; use restart() for a "
                             "preempted request")
        if not _is_int(prompt_len) or prompt_len < 0:
            raise StoreError(f"{where}: expected prompt_len to be an int >= 0, got "
                             f"{prompt_len!r}")
        hashes = self._check_cached(where, num_cached_tokens, block_hashes)
        nb = len(hashes)
        # the blocks this request hits are pinned: room for its table must not evict them (its
        # waits, counted now, would then be more than the bytes made room for)
        self.t.make_room(where, 0, _REQUEST_BYTES + self.t.growth_bytes(None, max(nb, 1))
                         + self.t.wait_bytes(hashes), self.t.hit_blocks(hashes))
        req = self.t.new_request(request, int(prompt_len), nb)
        return self.t.attach(req, hashes)

    def restart(self, request: Hashable, *, num_cached_tokens: int = 0,
                block_hashes: Sequence[Hashable] = ()) -> int:
        """A preempted request is scheduled again: drop its rows, attach its cached prefix."""
        req = self.t.get(request)
        where = f"restart({request!r})"
        hashes = self._check_cached(where, num_cached_tokens, block_hashes)
        self.t.make_room(where, 0, self.t.growth_bytes(req, len(hashes))
                         + self.t.wait_bytes(hashes), self.t.hit_blocks(hashes))
        self.t.drop_entries(req, 0)
        self.t.length[req.slot] = 0
        req.published = 0
        self.t.grow(req, len(hashes))
        return self.t.attach(req, hashes)

    def _check_cached(self, where: str, n: Any, hashes: Sequence[Hashable]) -> list[Hashable]:
        P = self.block_size
        if not _is_int(n) or n < 0 or n % P:
            raise StoreError(f"{where}: expected num_cached_tokens to be a multiple of the block "
                             f"size {P}, got {n!r}")
        try:
            got = len(hashes)
        except TypeError:
            raise StoreError(f"{where}: expected block_hashes to be a sequence, got "
                             f"{type(hashes).__name__}") from None
        if got < n // P:
            raise StoreError(f"{where}: {n} cached tokens need {n // P} block hashes, got {got}")
        out = list(hashes[:n // P])
        self._check_hashable(where, out)
        return out

    @staticmethod
    def _check_hashable(where: str, hashes: list[Hashable]) -> None:
        for j, h in enumerate(hashes):
            try:
                hash(h)
            except TypeError:
                raise StoreError(f"{where}: block hashes must be hashable, got "
                                 f"{type(h).__name__} {h!r} at block {j}") from None

    # ---- writing ------------------------------------------------------------------------------
    def _check_rows(self, where: str, ids_NLK: Any, valid_NL: Any) -> None:
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

    def _check_cells(self, where: str, ids_NLK: np.ndarray, valid_NL: np.ndarray | None,
                     rows: np.ndarray, ns: np.ndarray) -> None:
        bad = first_bad_cell(ids_NLK, valid_NL, rows, ns, self.num_experts)
        if bad < 0:
            return
        L = self.num_layers
        row, layer = divmod(bad, L)
        ids = ids_NLK[row, layer]
        if int(ids.max()) >= self.num_experts:
            raise StoreError(f"{where}: expected expert ids in [0, {self.num_experts}), got "
                             f"{ids.tolist()} at step row {row}, layer {layer}")
        raise StoreError(f"{where}: expected {self.top_k} distinct expert ids in each row, got "
                         f"{ids.tolist()} at step row {row}, layer {layer} (mark the cell "
                         "invalid if the router did not produce it)")

    def write(self, request: Hashable, start: int, ids_TLK: np.ndarray,
              valid_TL: np.ndarray | None = None, *, seek: bool = False) -> None:
        """Store the rows of positions ``[start, start + T)``.

        ``start`` must be the request's length, unless ``seek`` (see the module docstring).
        """
        self._ingest(f"write({request!r})", ids_TLK, valid_TL,
                     [(request, start, 0, getattr(ids_TLK, "shape", (0,))[0])], seek)

    def ingest(self, ids_NLK: np.ndarray, valid_NL: np.ndarray | None,
               segments: Sequence[tuple[Hashable, int, int, int]], *, seek: bool = False) -> None:
        """One engine step: ``segments`` of ``(request, start, first_row, num_rows)``.

        Rows ``[first_row, first_row + num_rows)`` of the step are positions
        ``[start, start + num_rows)`` of the request. Rows no segment names (padding, dummy
        tokens) are ignored, and not checked. All segments, and every named row (ids in
        ``[0, E)``, K distinct ids per valid cell), are checked before anything is stored.
        ``seek``: segments may start anywhere (see the module docstring).
        """
        self._ingest("ingest", ids_NLK, valid_NL, segments, seek)

    def _ingest(self, where: str, ids_NLK: np.ndarray, valid_NL: np.ndarray | None,
                segments: Sequence[tuple[Hashable, int, int, int]], seek: bool) -> None:
        self._check_rows(where, ids_NLK, valid_NL)
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
        self._ingest_arrays(where, ids_NLK, valid_NL, slots, starts, rows, ns, seek)

    def handle(self, request: Hashable) -> int:
        """An integer handle for ``request`` for :meth:`ingest_arrays`, valid until it is freed.

        A handle of a freed request is refused, even after its slot went to another request.
        """
        slot = self.t.get(request).slot
        return int(self.t.serial[slot]) << 32 | slot

    def ingest_arrays(self, ids_NLK: np.ndarray, valid_NL: np.ndarray | None,
                      handles: np.ndarray, starts: np.ndarray, first_rows: np.ndarray,
                      num_rows: np.ndarray, *, seek: bool = False) -> None:
        """:meth:`ingest` with the segments as integer arrays: no Python per segment.

        ``handles[i]`` (from :meth:`handle`), ``starts[i]``, ``first_rows[i]``, ``num_rows[i]``
        describe segment i as in :meth:`ingest`, with the same checks.
        """
        where = "ingest_arrays"
        self._check_rows(where, ids_NLK, valid_NL)
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
        self._ingest_arrays(where, ids_NLK, valid_NL, slots, st, rw, ns, seek)

    def _ingest_arrays(self, where: str, ids_NLK: np.ndarray, valid_NL: np.ndarray | None,
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
        self._check_cells(where, ids_NLK, valid_NL, rows, ns)
        clock = pool.tick()
        slow = np.flatnonzero(kind >= SEG_APPEND)  # appends and the rest: blocks to resolve
        pieces = None
        if slow.size:
            # plan and reserve first (a refusal changes nothing), then resolve tables
            fast_tails = self.t.tail_b[slots[kind == SEG_FAST]]
            by_slot = self.t.by_slot
            ai = slow[kind[slow] == SEG_APPEND]
            si = slow[kind[slow] == SEG_SLOW]
            pieces = self.t.resolve(where, [by_slot[i] for i in slots[si].tolist()],
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

    def publish(self, request: Hashable, block_hashes: Sequence[Hashable]) -> None:
        """Publish the request's full blocks under the engine's chained content hashes.

        ``block_hashes[j]`` is the hash of block j; blocks past the request's full blocks are
        ignored (the engine may know hashes of blocks the store has not seen complete yet).
        Idempotent. Requests waiting on a hash (same-step prefix hits) are linked to it here.
        """
        where = f"publish({request!r})"
        req = self.t.get(request)
        P = self.block_size
        try:
            full = min(int(self.t.length[req.slot]) // P, len(block_hashes))
            todo = list(block_hashes[req.published:full])
        except TypeError:
            raise StoreError(f"{where}: expected block_hashes to be a sequence, got "
                             f"{type(block_hashes).__name__}") from None
        self._check_hashable(where, todo)
        self.hash_conflicts += self.t.publish(where, req, todo, full, self.strict_hashes)

    def truncate(self, request: Hashable, length: int) -> None:
        """Forget positions ``>= length`` (e.g. rejected speculative tokens)."""
        req = self.t.get(request)
        old = int(self.t.length[req.slot])
        if not _is_int(length) or not 0 <= length <= old:
            raise StoreError(f"truncate({request!r}, {length!r}): expected 0 <= length <= {old}")
        where = f"truncate({request!r})"
        P = self.block_size
        j, o = divmod(int(length), P)
        need, pins = 0, np.zeros(0, np.int64)
        if o and j < req.nblocks:
            b = int(req.blocks[j])
            if b >= 0 and self.pool.gen[b] == req.gens[j]:
                pins = np.array([b], np.int64)
                need = 0 if self.pool.private(b) else 1
        self.t.make_room(where, need, 0, pins)
        try:
            self.t.cut(req, int(length), old)
        finally:
            self.pool.unreserve()

    def free(self, request: Hashable) -> None:
        """The request finished or was aborted: release its blocks (published ones stay cached)."""
        self.t.release(self.t.get(request))

    def clear(self) -> None:
        for r in list(self.t.reqs):
            self.free(r)

    # ---- reading ------------------------------------------------------------------------------
    def coverage(self, request: Hashable, start: int = 0, end: int | None = None) -> np.ndarray:
        """Per position: :data:`PRESENT`, :data:`EVICTED`, :data:`NOT_WRITTEN` or :data:`PENDING`."""
        req = self.t.get(request)
        length = int(self.t.length[req.slot])
        end = length if end is None else end
        if not (_is_int(start) and _is_int(end) and 0 <= start <= end):
            raise StoreError(f"coverage({request!r}): expected 0 <= start <= end, got {start!r}, "
                             f"{end!r}")
        P = self.block_size
        j0, j1 = start // P, -(-end // P)
        slots, alive, raw = self.t.entries(req, j0, j1)
        pool = self.pool
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

    def take(self, request: Hashable, start: int = 0, end: int | None = None, *,
             token_ids: np.ndarray | None = None, request_id: str | None = None,
             prompt_len: int | None = None, offset: int = 0,
             extra: dict[str, Any] | None = None) -> RoutingTrace:
        """The request's routes for positions ``[start, end)`` as a trace (one copy).

        ``end`` defaults to the request's length: prompt plus generated tokens minus the last,
        when the engine writes the rows of every forward. Positions whose block was evicted,
        that were never written, or that wait on a hash not published, are missing.
        ``token_ids`` (``[end - start]``) travel along. ``offset``: stored position ``p`` is
        position ``p - offset`` of the trace (a binding that stores rows by KV-cache column passes
        the column of position 0).
        """
        req = self.t.get(request)
        length = int(self.t.length[req.slot])
        end = length if end is None else end
        if not (_is_int(start) and _is_int(end) and _is_int(offset) and 0 <= start <= end
                and offset <= start):
            raise StoreError(f"take({request!r}): expected 0 <= start <= end and offset <= start,"
                             f" got {start!r}, {end!r}, offset {offset!r}")
        P, L, K = self.block_size, self.num_layers, self.top_k
        T = end - start
        tok = None
        if token_ids is not None:
            tok = np.asarray(token_ids)
            if tok.shape != (T,) or not np.issubdtype(tok.dtype, np.integer):
                raise StoreError(f"take({request!r}): expected {T} integer token ids, got "
                                 f"{tok.dtype} {tok.shape}")
            tok = tok.astype(np.int32)
        j0, j1 = start // P, -(-end // P)
        slots, alive, _ = self.t.entries(req, j0, j1)
        pool = self.pool
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
        # every stored row was checked on the way in (ids in range, distinct): no second scan
        return _trusted_trace(
            expert_ids=ids, missing=missing, num_experts=self.num_experts,
            moe_layers=self.moe_layers, request_id=str(request) if request_id is None else request_id,
            prompt_len=req.prompt_len if prompt_len is None else prompt_len, start=start - offset,
            model=self.model, token_ids=tok, extra=extra or {})

    # ---- checks -------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (for tests and simulators)."""
        self.t.check_invariants()
def _int_array(where: str, name: str, values: Sequence[Any]) -> np.ndarray:
    if set(map(type, values)) <= {int}:  # the common case, without numpy's type inference
        return np.fromiter(values, np.int64, len(values))
    arr = np.asarray(values)
    if arr.size and (arr.dtype.kind not in "iu" or arr.ndim != 1):
        bad = next((v for v in values if not _is_int(v)), values[0])
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


def _trusted_trace(**fields: Any) -> RoutingTrace:
    make = getattr(RoutingTrace, "from_verified", None)
    if make is None:  # before the trusted constructor landed: the full check
        return RoutingTrace(**fields)
    return make(**fields)
