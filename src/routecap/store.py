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

:class:`RouteStore` is the request-facing API; each concept under it has one home:
:mod:`~routecap.block_pool` (blocks, references, LRU, hash index, eviction),
:mod:`~routecap.store_tables` (request block tables, their per-slot state and bytes),
:mod:`~routecap.store_prefix` (prefix-cache attachment: publish, attach, waits on hashes),
:mod:`~routecap.store_ingest` (one engine step into the tables; its general path in
:mod:`~routecap.store_resolve`), :mod:`~routecap.store_read`
(coverage and the gather behind :meth:`RouteStore.take`) and :mod:`~routecap.store_rows` (the
compiled per-step kernels).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from .block_pool import BlockPool
from .store_ingest import StepIngest
from .store_prefix import PrefixIndex, cached_hashes, check_hashable
from .store_read import EVICTED, NOT_WRITTEN, PENDING, PRESENT, coverage_codes, gather_rows
from .store_tables import _REQUEST_BYTES, RequestTables, StoreError, is_int
from .trace import RoutingTrace, id_dtype_for

__all__ = ["PRESENT", "EVICTED", "NOT_WRITTEN", "PENDING", "RouteStore", "StoreError"]

_BLOCK_BOOKKEEPING = 128  # per block beyond ids/mask/lost: generation, refs, clock, flags, hash index


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
            if not is_int(v) or v < 1:
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
        # the request tables, what goes through a block hash, and the step writer over them
        self.t = RequestTables(self.pool, block_bytes=self.block_bytes,
                               budget_bytes=self.budget_bytes)
        self.prefix = PrefixIndex(self.t, strict=self.strict_hashes)
        self.steps = StepIngest(self.t, num_experts=self.num_experts, num_layers=L, top_k=K,
                                dtype=self.dtype)

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
    def hash_conflicts(self) -> int:
        """Hashes published twice with rows that disagree (see ``strict_hashes``)."""
        return self.prefix.conflicts

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
        if not is_int(prompt_len) or prompt_len < 0:
            raise StoreError(f"{where}: expected prompt_len to be an int >= 0, got "
                             f"{prompt_len!r}")
        hashes = cached_hashes(where, num_cached_tokens, block_hashes, self.block_size)
        nb = len(hashes)
        # the blocks this request hits are pinned: room for its table must not evict them (its
        # waits, counted now, would then be more than the bytes made room for)
        self.t.make_room(where, 0, _REQUEST_BYTES + self.t.growth_bytes(None, max(nb, 1))
                         + self.prefix.wait_bytes(hashes), self.prefix.hit_blocks(hashes))
        req = self.t.new_request(request, int(prompt_len), nb)
        return self.prefix.attach(req, hashes)

    def restart(self, request: Hashable, *, num_cached_tokens: int = 0,
                block_hashes: Sequence[Hashable] = ()) -> int:
        """A preempted request is scheduled again: drop its rows, attach its cached prefix."""
        req = self.t.get(request)
        where = f"restart({request!r})"
        hashes = cached_hashes(where, num_cached_tokens, block_hashes, self.block_size)
        self.t.make_room(where, 0, self.t.growth_bytes(req, len(hashes))
                         + self.prefix.wait_bytes(hashes), self.prefix.hit_blocks(hashes))
        self.t.drop_entries(req, 0)
        self.t.length[req.slot] = 0
        req.published = 0
        self.t.grow(req, len(hashes))
        return self.prefix.attach(req, hashes)

    def write(self, request: Hashable, start: int, ids_TLK: np.ndarray,
              valid_TL: np.ndarray | None = None, *, seek: bool = False) -> None:
        """Store the rows of positions ``[start, start + T)``.

        ``start`` must be the request's length, unless ``seek`` (see the module docstring).
        """
        self.steps.ingest(f"write({request!r})", ids_TLK, valid_TL,
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
        self.steps.ingest("ingest", ids_NLK, valid_NL, segments, seek)

    def handle(self, request: Hashable) -> int:
        """An integer handle for ``request`` for :meth:`ingest_arrays`, valid until it is freed.

        A handle of a freed request is refused, even after its slot went to another request.
        """
        return self.steps.handle(self.t.get(request))

    def ingest_arrays(self, ids_NLK: np.ndarray, valid_NL: np.ndarray | None,
                      handles: np.ndarray, starts: np.ndarray, first_rows: np.ndarray,
                      num_rows: np.ndarray, *, seek: bool = False) -> None:
        """:meth:`ingest` with the segments as integer arrays: no Python per segment.

        ``handles[i]`` (from :meth:`handle`), ``starts[i]``, ``first_rows[i]``, ``num_rows[i]``
        describe segment i as in :meth:`ingest`, with the same checks.
        """
        self.steps.ingest_arrays(ids_NLK, valid_NL, handles, starts, first_rows, num_rows, seek)

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
        check_hashable(where, todo)
        self.prefix.publish(where, req, todo, full)

    def truncate(self, request: Hashable, length: int) -> None:
        """Forget positions ``>= length`` (e.g. rejected speculative tokens)."""
        req = self.t.get(request)
        old = int(self.t.length[req.slot])
        if not is_int(length) or not 0 <= length <= old:
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
        if not (is_int(start) and is_int(end) and 0 <= start <= end):
            raise StoreError(f"coverage({request!r}): expected 0 <= start <= end, got {start!r}, "
                             f"{end!r}")
        return coverage_codes(self.t, req, start, end)

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
        if not (is_int(start) and is_int(end) and is_int(offset) and 0 <= start <= end
                and offset <= start):
            raise StoreError(f"take({request!r}): expected 0 <= start <= end and offset <= start,"
                             f" got {start!r}, {end!r}, offset {offset!r}")
        T = end - start
        tok = None
        if token_ids is not None:
            tok = np.asarray(token_ids)
            if tok.shape != (T,) or not np.issubdtype(tok.dtype, np.integer):
                raise StoreError(f"take({request!r}): expected {T} integer token ids, got "
                                 f"{tok.dtype} {tok.shape}")
            tok = tok.astype(np.int32)
        ids, missing = gather_rows(self.t, req, start, end)
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


def _trusted_trace(**fields: Any) -> RoutingTrace:
    make = getattr(RoutingTrace, "from_verified", None)
    if make is None:  # before the trusted constructor landed: the full check
        return RoutingTrace(**fields)
    return make(**fields)
