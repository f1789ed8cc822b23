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
from dataclasses import dataclass, field
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
from .trace import RoutingTrace, id_dtype_for

__all__ = ["PRESENT", "EVICTED", "NOT_WRITTEN", "PENDING", "RouteStore", "StoreError"]

#: :meth:`RouteStore.coverage` codes, per position.
PRESENT, EVICTED, NOT_WRITTEN, PENDING = 0, 1, 2, 3
# table entries that name no block
_LOST = -1  # the engine had the block, the store had evicted it (or the block was evicted later)
_GAP = -2  # never written (a seek past the end)
_WAIT = -3  # a prefix-cache hit on a hash not published yet
_BLOCK_BOOKKEEPING = 128  # per block beyond ids/mask/lost: generation, refs, clock, flags, hash index
_REQUEST_BYTES = 512  # per request: its record, dict entry and array headers (an upper bound)
_ENTRY_BYTES = 16  # per block-table slot: block (int64) and generation (int64)
_WAIT_BYTES = 512  # per entry waiting on a hash: its place in two dicts (an upper bound)


class StoreError(KeyError, ValueError):
    """A call the store cannot honour (unknown request, positions going backwards, bad shape)."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


@dataclass(eq=False)
class _Request:
    key: Hashable
    slot: int  # row of the store's per-request arrays (length, tail block)
    prompt_len: int
    blocks: np.ndarray  # int64 [capacity]: block per entry, or _LOST / _GAP / _WAIT
    gens: np.ndarray  # int64 [capacity]: the block's generation when the entry was made
    nblocks: int = 0
    published: int = 0  # leading full blocks already published
    waits: dict[int, Hashable] = field(default_factory=dict)  # entry -> the hash it waits for

    @property
    def capacity(self) -> int:
        return self.blocks.shape[0]


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
        self._reqs: dict[Hashable, _Request] = {}
        self._slot_of: dict[Hashable, int] = {}
        self._by_slot: list[_Request | None] = [None] * 64
        self._table_bytes = 0
        # per-request arrays by slot, for the vectorised step: length, tail block and generation
        self._len = np.zeros(64, np.int64)
        self._tail_b = np.full(64, -1, np.int64)
        self._tail_g = np.zeros(64, np.int64)
        self._cap = np.zeros(64, np.int64)  # table capacity
        self._mark = np.full(64, -1, np.int64)  # scratch for classify_segments
        self._serial = np.zeros(64, np.int64)  # bumped when a slot's request is freed
        self._live = np.zeros(64, np.bool_)
        self._no_valid = np.zeros((1, L), np.bool_)
        self._free_slots: list[int] = list(range(63, -1, -1))
        self._waiting: dict[Hashable, dict[int, _Request]] = {}  # hash -> {slot: request}
        self.hash_conflicts = 0
        self._row_dtype = np.dtype((np.void, L * K * self.dtype.itemsize))

    # ---- introspection ------------------------------------------------------------------------
    def __contains__(self, request: Hashable) -> bool:
        try:
            return request in self._reqs
        except TypeError:
            return False

    def __len__(self) -> int:
        return len(self._reqs)

    def requests(self) -> list[Hashable]:
        return list(self._reqs)

    def length(self, request: Hashable) -> int:
        """Positions covered so far (the next write starts here)."""
        return int(self._len[self._get(request).slot])

    @property
    def evictions(self) -> int:
        return self.pool.evictions

    @property
    def blocks_in_use(self) -> int:
        return self.pool.in_use

    @property
    def table_bytes(self) -> int:
        """Bytes the request block tables account for (see ``budget_bytes``)."""
        return self._table_bytes

    @property
    def nbytes(self) -> int:
        """Bytes held: blocks in use plus block tables; never more than ``budget_bytes``."""
        return self.pool.in_use * self.block_bytes + self._table_bytes

    @property
    def reserved_bytes(self) -> int:
        """Bytes the full pool accounts for (the most the store can ever hold)."""
        return self.num_blocks * self.block_bytes

    def _get(self, request: Hashable) -> _Request:
        try:
            return self._reqs[request]
        except (KeyError, TypeError):
            raise StoreError(f"unknown request {request!r}; the store holds {len(self._reqs)} "
                             "requests") from None

    # ---- budget: block tables share it with the pool ---------------------------------------------
    def _limit_for(self, table_bytes: int) -> int:
        return self.num_blocks - -(-table_bytes // self.block_bytes)

    def _make_room(self, where: str, new_blocks: int, table_growth: int,
                   pinned: np.ndarray) -> None:
        """Check that ``new_blocks`` blocks and ``table_growth`` table bytes fit, then reserve.

        Raises (changing nothing) if they cannot fit even after evicting every unpinned block.
        """
        pool = self.pool
        limit = self._limit_for(self._table_bytes + table_growth)
        if limit < 0 or not pool.can_reserve(new_blocks, pinned, limit=limit):
            raise StoreError(
                f"{where}: the budget of {self.budget_bytes} bytes cannot hold what this call "
                f"needs: {new_blocks} new blocks of {self.block_bytes} bytes next to "
                f"{len(pinned)} blocks this call uses and {self._table_bytes + table_growth} bytes "
                f"of block tables for {len(self._reqs)} requests; raise budget_bytes or free "
                "requests")
        self._table_bytes += table_growth
        pool.limit = limit
        pool.shrink_to_limit(pinned)
        pool.reserve(new_blocks, pinned)

    def _grow(self, req: _Request, need: int) -> None:
        """Make room for ``need`` table entries (bytes were accounted for by the caller)."""
        cap = req.capacity
        if need <= cap:
            return
        new = _capacity_for(need)
        blocks = np.full(new, _GAP, np.int64)
        gens = np.zeros(new, np.int64)
        blocks[:cap] = req.blocks
        gens[:cap] = req.gens
        req.blocks, req.gens = blocks, gens
        self._cap[req.slot] = new

    @staticmethod
    def _growth_bytes(req: _Request | None, need: int) -> int:
        cap = 0 if req is None else req.capacity
        return 0 if need <= cap else (_capacity_for(need) - cap) * _ENTRY_BYTES

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
            exists = request in self._reqs
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
        self._make_room(where, 0, _REQUEST_BYTES + self._growth_bytes(None, max(nb, 1))
                        + self._wait_bytes(hashes), np.zeros(0, np.int64))
        if not self._free_slots:
            self._grow_slots()
        slot = self._free_slots.pop()
        cap = _capacity_for(max(nb, 1))
        req = _Request(key=request, slot=slot, prompt_len=int(prompt_len),
                       blocks=np.full(cap, _GAP, np.int64), gens=np.zeros(cap, np.int64))
        self._reqs[request] = req
        self._slot_of[request] = slot
        self._by_slot[slot] = req
        self._live[slot] = True
        self._cap[slot] = cap
        self._len[slot] = 0
        self._tail_b[slot] = -1
        return self._attach(req, hashes)

    def restart(self, request: Hashable, *, num_cached_tokens: int = 0,
                block_hashes: Sequence[Hashable] = ()) -> int:
        """A preempted request is scheduled again: drop its rows, attach its cached prefix."""
        req = self._get(request)
        where = f"restart({request!r})"
        hashes = self._check_cached(where, num_cached_tokens, block_hashes)
        self._make_room(where, 0, self._growth_bytes(req, len(hashes)) + self._wait_bytes(hashes),
                        np.zeros(0, np.int64))
        self._drop_entries(req, 0)
        self._len[req.slot] = 0
        req.published = 0
        self._grow(req, len(hashes))
        return self._attach(req, hashes)

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

    def _wait_bytes(self, hashes: list[Hashable]) -> int:
        by_hash = self.pool.by_hash
        return _WAIT_BYTES * sum(h not in by_hash for h in hashes)

    def _attach(self, req: _Request, hashes: list[Hashable]) -> int:
        pool, P = self.pool, self.block_size
        have = 0
        for j, h in enumerate(hashes):
            b = pool.by_hash.get(h)
            if b is not None:
                pool.ref(b)
                req.blocks[j] = b
                req.gens[j] = pool.gen[b]
                have += P
            else:  # not published (yet): wait for it; if it never comes, it reads missing
                req.blocks[j] = _WAIT
                req.waits[j] = h
                self._waiting.setdefault(h, {})[req.slot] = req
        req.nblocks = len(hashes)
        self._len[req.slot] = len(hashes) * P
        req.published = len(hashes)
        self._tail_b[req.slot] = -1
        return have

    def _drop_entries(self, req: _Request, keep: int) -> None:
        """Release table entries ``>= keep`` (blocks unreferenced, waits cancelled)."""
        pool = self.pool
        for j in range(keep, req.nblocks):
            b = int(req.blocks[j])
            if b >= 0:
                pool.unref(b, int(req.gens[j]))
            elif b == _WAIT:
                self._cancel_wait(req, j)
        req.blocks[keep:req.nblocks] = _GAP
        req.nblocks = min(req.nblocks, keep)
        self._tail_b[req.slot] = -1

    def _cancel_wait(self, req: _Request, j: int) -> None:
        h = req.waits.pop(j)
        self._table_bytes -= _WAIT_BYTES
        self.pool.limit = self._limit_for(self._table_bytes)
        if not any(h2 == h for h2 in req.waits.values()):
            waiters = self._waiting.get(h)
            if waiters is not None:
                waiters.pop(req.slot, None)
                if not waiters:
                    del self._waiting[h]

    def _grow_slots(self) -> None:
        n = self._len.shape[0]
        self._len = np.concatenate([self._len, np.zeros(n, np.int64)])
        self._tail_b = np.concatenate([self._tail_b, np.full(n, -1, np.int64)])
        self._tail_g = np.concatenate([self._tail_g, np.zeros(n, np.int64)])
        self._cap = np.concatenate([self._cap, np.zeros(n, np.int64)])
        self._serial = np.concatenate([self._serial, np.zeros(n, np.int64)])
        self._live = np.concatenate([self._live, np.zeros(n, np.bool_)])
        self._free_slots.extend(range(2 * n - 1, n - 1, -1))
        self._by_slot.extend([None] * n)

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
        N = ids_NLK.shape[0]
        try:
            keys, starts_l, rows_l, ns_l = zip(*segments) if len(segments) else ((), (), (), ())
            slots = np.array(list(map(self._slot_of.__getitem__, keys)), np.int64)
        except (KeyError, TypeError, ValueError):
            for seg in segments:
                if not isinstance(seg, (tuple, list)) or len(seg) != 4:
                    raise StoreError(f"{where}: expected segments of (request, start, first_row, "
                                     f"num_rows), got {seg!r}") from None
                self._get(seg[0])
            raise StoreError(f"{where}: bad segments {segments!r}") from None
        starts = _int_array(where, "start", starts_l)
        rows = _int_array(where, "first_row", rows_l)
        ns = _int_array(where, "num_rows", ns_l)
        self._ingest_arrays(where, ids_NLK, valid_NL, slots, starts, rows, ns, seek)

    def handle(self, request: Hashable) -> int:
        """An integer handle for ``request`` for :meth:`ingest_arrays`, valid until it is freed.

        A handle of a freed request is refused, even after its slot went to another request.
        """
        slot = self._get(request).slot
        return int(self._serial[slot]) << 32 | slot

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
        ok = slots < self._len.shape[0]
        ok[ok] = (h[ok] >> 32 == self._serial[slots[ok]]) & self._live[slots[ok]]
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
        if self._mark.shape[0] != self._len.shape[0]:
            self._mark = np.full(self._len.shape[0], -1, np.int64)
        bad = classify_segments(slots, starts, rows, ns, N, self._len, self._tail_b,
                                self._tail_g, self._cap, pool.gen, pool.refs, pool.published,
                                P, seek, kind, lens, self._mark)
        if bad >= 0:
            i, code = divmod(bad, 4)
            keys = [self._by_slot[int(slots[i])].key] * (i + 1)
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
            fast_tails = self._tail_b[slots[kind == SEG_FAST]]
            by_slot = self._by_slot
            ai = slow[kind[slow] == SEG_APPEND]
            si = slow[kind[slow] == SEG_SLOW]
            pieces = self._resolve_slow(where, [by_slot[i] for i in slots[si].tolist()],
                                        starts[si], rows[si], ns[si], lens[si], fast_tails,
                                        [by_slot[i] for i in slots[ai].tolist()], starts[ai],
                                        rows[ai], ns[ai])
        d = np.empty(S, np.int64)
        s_ = np.empty(S, np.int64)
        c = np.empty(S, np.int64)
        k = fast_runs(kind, slots, starts, rows, ns, self._tail_b, P, self._len, pool.last_use,
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

    def _resolve_slow(self, where: str, reqs: list[_Request], starts: np.ndarray,
                      rows: np.ndarray, ns: np.ndarray, lens: np.ndarray,
                      pinned_fast: np.ndarray, app_reqs: list[_Request], app_starts: np.ndarray,
                      app_rows: np.ndarray, app_ns: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[np.ndarray, int]]]:
        """Segments that need blocks: plan all, reserve once, then resolve.

        ``app_*``: segments that start a fresh block at their table's end (one block each).
        The rest may copy on write, cut, leave gaps or span blocks.
        """
        pool, P = self.pool, self.block_size
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
        table_growth = sum(self._growth_bytes(r, growth[r.slot]) for r in
                           {r.slot: r for r in reqs}.values())
        pinned = np.unique(np.concatenate([pinned_fast, np.asarray(pins, np.int64)]))
        self._make_room(where, need + len(app_reqs), table_growth, pinned)
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
                self._len[slots] = app_starts + app_ns
                open_ = (app_ns < P)
                self._tail_b[slots] = np.where(open_, bs, -1)
                self._tail_g[slots] = gs
                dst.extend((bs * P).tolist())
                src.extend(app_rows.tolist())
                cnt.extend(app_ns.tolist())
            for req, start, row, n, length in zip(reqs, starts.tolist(), rows.tolist(),
                                                  ns.tolist(), lens.tolist(), strict=True):
                self._grow(req, growth[req.slot])
                length = int(self._len[req.slot]) if repeated else length
                if start < length:
                    self._cut(req, start, length)
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
                    b = self._writable(req, j, length)
                    dst.append(b * P + off)
                    src.append(row + pos - start)
                    cnt.append(m)
                    pos += m
                if n:
                    # entries between the old table end and the first written one are gaps
                    self._len[req.slot] = end
                    self._sync_tail(req, end)
                else:
                    self._len[req.slot] = start
                    self._sync_tail(req, start)
        finally:
            pool.unreserve()
        return (np.asarray(dst, np.int64), np.asarray(src, np.int64), np.asarray(cnt, np.int64),
                bulk)

    def _sync_tail(self, req: _Request, length: int) -> None:
        j, o = divmod(length, self.block_size)
        slot = req.slot
        if o and j < req.nblocks and req.blocks[j] >= 0:
            self._tail_b[slot] = req.blocks[j]
            self._tail_g[slot] = req.gens[j]
        else:
            self._tail_b[slot] = -1

    def _cut(self, req: _Request, length: int, old: int) -> None:
        """Forget positions ``>= length`` (``old`` is the current length)."""
        P = self.block_size
        keep = -(-length // P)
        self._drop_entries(req, keep)
        j, o = divmod(length, P)
        if o and j < req.nblocks:
            b = int(req.blocks[j])
            if b >= 0 and self.pool.gen[b] == req.gens[j]:
                b = self._writable(req, j, old)  # the partial block: drop its rows from o on
                self.pool.valid[b, o:] = False
                self.pool.lost[b, o:] = False
        self._len[req.slot] = length
        req.published = min(req.published, length // P)
        self._sync_tail(req, length)

    def _writable(self, req: _Request, j: int, length: int) -> int:
        """Entry j of ``req`` as a private, alive block (from the reservation if new)."""
        pool, P = self.pool, self.block_size
        if j < req.nblocks:
            b, g = int(req.blocks[j]), int(req.gens[j])
            if b >= 0 and pool.gen[b] == g:
                if pool.private(b):
                    pool.last_use[b] = pool.clock
                    return b
                nb = pool.take()
                pool.copy_block(nb, b)  # copy-on-write: the block is shared or published
                o = length - j * P
                if 0 <= o < P:
                    pool.valid[nb, o:] = False
                    pool.lost[nb, o:] = False
                pool.unref(b, g)
            else:
                nb = pool.take()
                if b == _WAIT:
                    self._cancel_wait(req, j)
                if b != _GAP:  # the block was evicted (or never came): what it held is lost
                    pool.lost[nb, :max(0, min(P, length - j * P))] = True
                if b >= 0:
                    pool.unref(b, g)
        else:
            nb = pool.take()
            req.blocks[req.nblocks:j] = _GAP
            req.nblocks = j + 1
        req.blocks[j] = nb
        req.gens[j] = pool.gen[nb]
        return nb

    def publish(self, request: Hashable, block_hashes: Sequence[Hashable]) -> None:
        """Publish the request's full blocks under the engine's chained content hashes.

        ``block_hashes[j]`` is the hash of block j; blocks past the request's full blocks are
        ignored (the engine may know hashes of blocks the store has not seen complete yet).
        Idempotent. Requests waiting on a hash (same-step prefix hits) are linked to it here.
        """
        where = f"publish({request!r})"
        req = self._get(request)
        P = self.block_size
        try:
            full = min(int(self._len[req.slot]) // P, len(block_hashes))
            todo = list(block_hashes[req.published:full])
        except TypeError:
            raise StoreError(f"{where}: expected block_hashes to be a sequence, got "
                             f"{type(block_hashes).__name__}") from None
        self._check_hashable(where, todo)
        pool = self.pool
        if self.strict_hashes:
            for j, h in enumerate(todo, start=req.published):
                b, other = int(req.blocks[j]), pool.by_hash.get(h)
                if (b >= 0 and pool.gen[b] == req.gens[j] and other is not None and other != b
                        and self._disagree(b, other)):
                    raise StoreError(f"{where}: block {j} hash {h!r} was published before with "
                                     "different routes; block hashes must be chained content "
                                     "hashes (the hash of block j covers blocks 0..j)")
        for j, h in enumerate(todo, start=req.published):
            b, g = int(req.blocks[j]), int(req.gens[j])
            if b < 0 or pool.gen[b] != g:
                continue  # evicted, or waiting itself: nothing to publish
            other = pool.by_hash.get(h)
            if other == b:
                continue
            if other is not None:
                if self._disagree(b, other):
                    self.hash_conflicts += 1  # keep our own rows, unpublished
                    continue
                if not (pool.valid[b] & ~pool.valid[other]).any():
                    # deduplicate: link to the block already published under this hash
                    pool.ref(other)
                    req.blocks[j] = other
                    req.gens[j] = pool.gen[other]
                    pool.unref(b, g)
                    continue
                # the published copy lost cells (an eviction) that this one has: publish ours
                # instead; the old one stays with the requests that hold it
                pool.unpublish(other)
            if not pool.published[b]:
                pool.publish(b, h)
                self._wake(h, b)
        req.published = max(req.published, full)
        self._sync_tail(req, int(self._len[req.slot]))

    def _disagree(self, a: int, b: int) -> bool:
        pool = self.pool
        both = pool.valid[a] & pool.valid[b]
        return bool((pool.ids[a][both] != pool.ids[b][both]).any())

    def _wake(self, h: Hashable, b: int) -> None:
        """Link every entry waiting on hash h to block b."""
        waiters = self._waiting.pop(h, None)
        if not waiters:
            return
        pool = self.pool
        for req in waiters.values():
            for j in [j for j, h2 in req.waits.items() if h2 == h]:
                del req.waits[j]
                self._table_bytes -= _WAIT_BYTES
                pool.ref(b)
                req.blocks[j] = b
                req.gens[j] = pool.gen[b]
        pool.limit = self._limit_for(self._table_bytes)

    def truncate(self, request: Hashable, length: int) -> None:
        """Forget positions ``>= length`` (e.g. rejected speculative tokens)."""
        req = self._get(request)
        old = int(self._len[req.slot])
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
        self._make_room(where, need, 0, pins)
        try:
            self._cut(req, int(length), old)
        finally:
            self.pool.unreserve()

    def free(self, request: Hashable) -> None:
        """The request finished or was aborted: release its blocks (published ones stay cached)."""
        req = self._get(request)
        self._drop_entries(req, 0)
        del self._reqs[request]
        del self._slot_of[request]
        self._by_slot[req.slot] = None
        self._live[req.slot] = False
        self._serial[req.slot] += 1
        self._table_bytes -= _REQUEST_BYTES + req.capacity * _ENTRY_BYTES
        self._free_slots.append(req.slot)
        self.pool.limit = self._limit_for(self._table_bytes)

    def clear(self) -> None:
        for r in list(self._reqs):
            self.free(r)

    # ---- reading ------------------------------------------------------------------------------
    def _entries(self, req: _Request, j0: int, j1: int) -> tuple[np.ndarray, np.ndarray]:
        """Blocks of entries ``[j0, j1)`` (0 where not alive) and whether each is alive."""
        n = max(0, j1 - j0)
        blocks = np.full(n, _GAP, np.int64)
        gens = np.zeros(n, np.int64)
        k = max(0, min(j1, req.nblocks) - j0)
        blocks[:k] = req.blocks[j0:j0 + k]
        gens[:k] = req.gens[j0:j0 + k]
        real = blocks >= 0
        alive = real.copy()
        alive[real] = self.pool.gen[blocks[real]] == gens[real]
        return np.where(alive, blocks, 0), alive, blocks

    def coverage(self, request: Hashable, start: int = 0, end: int | None = None) -> np.ndarray:
        """Per position: :data:`PRESENT`, :data:`EVICTED`, :data:`NOT_WRITTEN` or :data:`PENDING`."""
        req = self._get(request)
        length = int(self._len[req.slot])
        end = length if end is None else end
        if not (_is_int(start) and _is_int(end) and 0 <= start <= end):
            raise StoreError(f"coverage({request!r}): expected 0 <= start <= end, got {start!r}, "
                             f"{end!r}")
        P = self.block_size
        j0, j1 = start // P, -(-end // P)
        slots, alive, raw = self._entries(req, j0, j1)
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
        req = self._get(request)
        length = int(self._len[req.slot])
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
        slots, alive, _ = self._entries(req, j0, j1)
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
        pool, P = self.pool, self.block_size
        expected = np.zeros(pool.num_blocks, np.int64)
        table_bytes = 0
        slots = set()
        waits = 0
        for key, req in self._reqs.items():
            assert req.slot not in slots, f"slot {req.slot} used twice"
            slots.add(req.slot)
            table_bytes += (_REQUEST_BYTES + req.capacity * _ENTRY_BYTES
                            + _WAIT_BYTES * len(req.waits))
            length = int(self._len[req.slot])
            assert req.nblocks <= -(-length // P), (key, length, req.nblocks)
            b = req.blocks[:req.nblocks]
            g = req.gens[:req.nblocks]
            real = b >= 0
            alive = real.copy()
            alive[real] = pool.gen[b[real]] == g[real]
            np.add.at(expected, b[alive], 1)
            assert (req.blocks[req.nblocks:] == _GAP).all(), f"{key!r}: entries past the table"
            waiting = set(np.flatnonzero(b == _WAIT).tolist())
            assert waiting == set(req.waits), f"{key!r}: waits {sorted(req.waits)} vs {waiting}"
            for h in req.waits.values():
                assert req.slot in self._waiting.get(h, {}), f"{key!r} waits on {h!r} unlisted"
                assert h not in pool.by_hash, f"{key!r} waits on published {h!r}"
            waits += len(req.waits)
            # rows at or past the length of an alive private tail block are invalid
            j, o = divmod(length, P)
            if o and j < req.nblocks and alive[j] and pool.private(int(b[j])):
                assert not pool.valid[b[j], o:].any(), f"{key!r}: valid rows past the length"
            tb = int(self._tail_b[req.slot])
            if tb >= 0:
                assert o and j < req.nblocks and tb == b[j] and self._tail_g[req.slot] == g[j], \
                    f"{key!r}: stale tail cache"
            assert req.published <= length // P, f"{key!r}: published past the full blocks"
        for h, waiters in self._waiting.items():
            for slot, req in waiters.items():
                assert self._reqs.get(req.key) is req and req.slot == slot, "a stale waiter"
                assert h in req.waits.values(), f"listed waiter does not wait on {h!r}"
        assert table_bytes == self._table_bytes, (table_bytes, self._table_bytes)
        assert pool.limit == self._limit_for(table_bytes), (pool.limit, table_bytes)
        assert self.nbytes <= self.budget_bytes, (self.nbytes, self.budget_bytes)
        pool.check_invariants(expected)


def _capacity_for(n: int) -> int:
    c = 4
    while c < n:
        c *= 2
    return c


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
