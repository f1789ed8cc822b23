"""Serving-grade host route store: a block pool like a KV cache, per-request block tables.

Shape legend: T tokens, L MoE layers, K top-k, N rows of one step, P block size (tokens per block).

A serving engine does not run one request per forward: rows of many requests share a step, long
prompts arrive in chunks, cached prefixes skip the forward, requests are preempted and recomputed,
speculative tokens are computed and rejected. The store mirrors the engine's KV cache:

* Routes live in a preallocated pool of blocks ``[num_blocks, P, L, K]`` (plus a validity mask
  ``[num_blocks, P, L]``) sized by a byte budget: the store never holds more than ``budget_bytes``.
* Each request has a block table: block j holds positions ``[j*P, (j+1)*P)``. Partial blocks are
  the request's own; a full block is *published* under the content hash the engine gives it, so a
  later request whose prefix hits the engine's cache gets those routes without a forward
  (:meth:`RouteStore.add_request` with ``num_cached_tokens``).
* Writing into a shared block copies it first (copy-on-write); publishing a block whose hash is
  already known links to the existing block (deduplication).
* When the pool is full, the least recently used block is evicted, unreferenced published blocks
  before blocks in use. Routes of an evicted block come back *missing*, never wrong: every table
  entry carries the block's generation, and a reused block has a new one.

Positions only move forward: :meth:`write` continues at the request's length; rejected
speculative rows are dropped with :meth:`truncate`, a preempted and rescheduled request starts
again with :meth:`restart`. Every call checks all of its arguments before changing anything, so a
bad call leaves every request (its own included) as it was.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .trace import RoutingTrace, id_dtype_for

__all__ = ["PRESENT", "EVICTED", "NOT_WRITTEN", "RouteStore", "StoreError"]

#: :meth:`RouteStore.coverage` codes, per position.
PRESENT, EVICTED, NOT_WRITTEN = 0, 1, 2
_LOST = (-1, -1)  # a table entry whose block the engine had but the store had evicted
_BOOKKEEPING_BYTES = 128


class StoreError(KeyError, ValueError):
    """A call the store cannot honour (unknown request, positions going backwards, bad shape)."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


@dataclass
class _Request:
    prompt_len: int
    table: list[tuple[int, int]] = field(default_factory=list)  # (block, generation) per block
    length: int = 0  # positions [0, length) are covered (present, evicted or never written)
    published: int = 0  # leading full blocks already published


class RouteStore:
    """Routes of many requests, by (request, absolute position), within a byte budget.

    Args:
        num_experts, moe_layers, top_k: the model's router shape (L = len(moe_layers)).
        block_size: tokens per block (use the engine's KV block size so hashes line up).
        budget_bytes: the most the store may hold (ids and masks of all blocks).
        model: recorded in the traces :meth:`take` returns.

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
                 block_size: int = 16, budget_bytes: int = 256 << 20, model: str = "") -> None:
        self.num_experts = int(num_experts)
        self.moe_layers = tuple(int(x) for x in moe_layers)
        self.num_layers = len(self.moe_layers)
        self.top_k = int(top_k)
        self.model = model
        self.dtype = id_dtype_for(self.num_experts)
        if block_size < 1:
            raise StoreError(f"RouteStore: expected block_size >= 1, got {block_size}")
        if self.num_layers < 1 or self.top_k < 1:
            raise StoreError(f"RouteStore: expected at least one MoE layer and top_k >= 1, got "
                             f"moe_layers={self.moe_layers}, top_k={self.top_k}")
        self.block_size = P = int(block_size)
        L, K = self.num_layers, self.top_k
        # route data, validity mask, and the bookkeeping of one block (generation, references,
        # free-list slot, LRU entry; about 128 bytes), so that the budget bounds everything
        self.block_bytes = P * L * K * self.dtype.itemsize + P * L + P + _BOOKKEEPING_BYTES
        self.num_blocks = int(budget_bytes) // self.block_bytes
        if self.num_blocks < 1:
            raise StoreError(f"RouteStore: a budget of {budget_bytes} bytes holds no block; one "
                             f"block of {P} tokens x {L} layers x top-{K} needs "
                             f"{self.block_bytes} bytes")
        self.budget_bytes = int(budget_bytes)
        # NOTE: np.zeros maps fresh pages lazily: memory is committed as blocks are first used.
        self._ids = np.zeros((self.num_blocks, P, L, K), self.dtype)
        self._valid = np.zeros((self.num_blocks, P, L), np.bool_)
        # positions of a block whose rows were lost to an eviction before the block was rebuilt
        self._lost = np.zeros((self.num_blocks, P), np.bool_)
        self._gen = np.zeros(self.num_blocks, np.int64)
        self._refs = np.zeros(self.num_blocks, np.int32)
        self._hash: dict[int, Hashable] = {}  # block -> hash, for published blocks
        self._by_hash: dict[Hashable, int] = {}
        self._free = np.arange(self.num_blocks - 1, -1, -1, dtype=np.int32)  # a stack
        self._nfree = self.num_blocks
        # blocks in use, least recently used first: referenced by a request, or only cached
        # (published, no request left): those go first when room is needed
        self._lru_used: OrderedDict[int, None] = OrderedDict()
        self._lru_cached: OrderedDict[int, None] = OrderedDict()
        self._reqs: dict[Hashable, _Request] = {}
        self._pinned: set[int] = set()
        self._cow_source = -1  # the block being copied on write: never the eviction victim
        self._flush: Any = None  # set while a scatter is pending (see _scatter)
        self._ids_flat = self._ids.reshape(self.num_blocks * P, L, K)
        self._valid_flat = self._valid.reshape(self.num_blocks * P, L)
        self.evictions = 0

    # ---- introspection ------------------------------------------------------------------------
    def __contains__(self, request: Hashable) -> bool:
        return request in self._reqs

    def __len__(self) -> int:
        return len(self._reqs)

    def requests(self) -> list[Hashable]:
        return list(self._reqs)

    def length(self, request: Hashable) -> int:
        """Positions covered so far (the next write starts here)."""
        return self._get(request).length

    @property
    def blocks_in_use(self) -> int:
        return self.num_blocks - self._nfree

    @property
    def nbytes(self) -> int:
        """Bytes of route data held (blocks in use); never more than ``budget_bytes``."""
        return self.blocks_in_use * self.block_bytes

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

    # ---- blocks -------------------------------------------------------------------------------
    def _alive(self, entry: tuple[int, int]) -> bool:
        b, g = entry
        return b >= 0 and self._gen[b] == g

    def _touch(self, b: int) -> None:
        (self._lru_used if self._refs[b] > 0 else self._lru_cached).move_to_end(b)

    def _ref(self, b: int) -> None:
        """One more request uses block b."""
        if self._refs[b] == 0:
            self._lru_cached.pop(b, None)
        else:
            self._lru_used.pop(b, None)
        self._refs[b] += 1
        self._lru_used[b] = None

    def _evict_one(self) -> None:
        victim = next(iter(self._lru_cached), None)  # nothing references these: least harm
        if victim is None:
            for b in self._lru_used:
                if b not in self._pinned and b != self._cow_source:
                    victim = b
                    break
        if victim is None and self._flush is not None and self._pinned:
            self._flush()  # write what this call resolved so far, then its blocks may go
            return self._evict_one()
        if victim is None:
            raise StoreError(f"RouteStore: the budget of {self.budget_bytes} bytes "
                             f"({self.num_blocks} blocks) cannot hold the blocks one write needs")
        self._release_storage(victim)
        self.evictions += 1

    def _release_storage(self, b: int) -> None:
        if self._lru_used.pop(b, 0) == 0:
            del self._lru_cached[b]
        h = self._hash.pop(b, None)
        if h is not None and self._by_hash.get(h) == b:
            del self._by_hash[h]
        self._refs[b] = 0
        self._gen[b] += 1  # every table entry still naming this block is now stale: missing
        self._free[self._nfree] = b
        self._nfree += 1

    def _allocate(self) -> int:
        if not self._nfree:
            self._evict_one()
        self._nfree -= 1
        b = int(self._free[self._nfree])
        self._valid[b] = False
        self._lost[b] = False
        self._refs[b] = 1  # the caller's
        self._lru_used[b] = None
        return b

    def _unref(self, entry: tuple[int, int]) -> None:
        if not self._alive(entry):
            return
        b = entry[0]
        self._refs[b] -= 1
        if self._refs[b] > 0:
            return
        if b not in self._hash:
            self._release_storage(b)  # a private block nobody uses: free at once
        else:
            del self._lru_used[b]  # published: stays cached for prefix hits
            self._lru_cached[b] = None

    def _writable(self, req: _Request, j: int) -> int:
        """Block j of ``req`` as a private, alive block (allocating or copying as needed)."""
        entry = req.table[j] if j < len(req.table) else None
        if entry is not None and self._alive(entry):
            b = entry[0]
            if self._refs[b] == 1 and b not in self._hash:
                self._touch(b)
                return b
            self._cow_source = b
            try:
                nb = self._allocate()
            finally:
                self._cow_source = -1
            self._ids[nb] = self._ids[b]  # copy-on-write: the block is shared or published
            self._valid[nb] = self._valid[b]
            self._lost[nb] = self._lost[b]
            self._unref(entry)
        else:
            nb = self._allocate()
            if entry is not None:  # the block was evicted: what it held is lost, not unwritten
                self._lost[nb, :max(0, min(self.block_size, req.length - j * self.block_size))] = True
                self._unref(entry)
        while len(req.table) <= j:
            req.table.append(_LOST)
        req.table[j] = (nb, int(self._gen[nb]))
        return nb

    # ---- requests -----------------------------------------------------------------------------
    def add_request(self, request: Hashable, *, prompt_len: int, num_cached_tokens: int = 0,
                    block_hashes: Sequence[Hashable] = ()) -> int:
        """Start a request whose first ``num_cached_tokens`` positions hit the engine's prefix cache.

        ``block_hashes`` are the hashes of those cached full blocks (at least
        ``num_cached_tokens // block_size`` of them). Returns how many of the cached positions
        the store still has routes for; the rest (evicted here) are missing.
        """
        if request in self._reqs:
            raise StoreError(f"add_request({request!r}): the request already exists; use "
                             "restart() for a preempted request")
        if not isinstance(prompt_len, (int, np.integer)) or prompt_len < 0:
            raise StoreError(f"add_request({request!r}): expected prompt_len >= 0, got "
                             f"{prompt_len!r}")
        self._check_cached(request, num_cached_tokens, block_hashes)
        req = _Request(prompt_len=int(prompt_len))
        self._reqs[request] = req
        return self._attach(req, num_cached_tokens, block_hashes)

    def restart(self, request: Hashable, *, num_cached_tokens: int = 0,
                block_hashes: Sequence[Hashable] = ()) -> int:
        """A preempted request is scheduled again: drop its rows, attach its cached prefix."""
        req = self._get(request)
        self._check_cached(request, num_cached_tokens, block_hashes)
        for entry in req.table:
            self._unref(entry)
        req.table, req.length, req.published = [], 0, 0
        return self._attach(req, num_cached_tokens, block_hashes)

    def _check_cached(self, request: Hashable, n: int, hashes: Sequence[Hashable]) -> None:
        P = self.block_size
        if not isinstance(n, (int, np.integer)) or n < 0 or n % P:
            raise StoreError(f"{request!r}: expected num_cached_tokens to be a multiple of the "
                             f"block size {P}, got {n!r}")
        if len(hashes) < n // P:
            raise StoreError(f"{request!r}: {n} cached tokens need {n // P} block hashes, got "
                             f"{len(hashes)}")
        for h in hashes[:n // P]:
            if not isinstance(h, Hashable):
                raise StoreError(f"{request!r}: block hashes must be hashable, got "
                                 f"{type(h).__name__}")

    def _attach(self, req: _Request, n: int, hashes: Sequence[Hashable]) -> int:
        P = self.block_size
        have = 0
        for j in range(n // P):
            b = self._by_hash.get(hashes[j])
            if b is None:
                req.table.append(_LOST)  # the engine kept it, the store had to evict it
                continue
            self._ref(b)
            req.table.append((b, int(self._gen[b])))
            have += P
        req.length = n
        req.published = n // P
        return have

    def _check_rows(self, where: str, ids_TLK: np.ndarray, valid_TL: np.ndarray | None) -> None:
        L, K = self.num_layers, self.top_k
        if not isinstance(ids_TLK, np.ndarray) or ids_TLK.ndim != 3 or ids_TLK.shape[1:] != (L, K):
            raise StoreError(f"{where}: expected rows of shape [T, L={L}, K={K}], got "
                             f"{getattr(ids_TLK, 'shape', type(ids_TLK).__name__)}")
        if ids_TLK.dtype != self.dtype:
            raise StoreError(f"{where}: expected dtype {self.dtype}, got {ids_TLK.dtype}")
        if valid_TL is not None and (valid_TL.shape != ids_TLK.shape[:2]
                                     or valid_TL.dtype != np.bool_):
            raise StoreError(f"{where}: expected a bool valid mask of shape {ids_TLK.shape[:2]}, "
                             f"got {valid_TL.dtype} {valid_TL.shape}")
        if ids_TLK.size and self.num_experts < (1 << (8 * self.dtype.itemsize)):
            hi = ids_TLK.max() if valid_TL is None else (
                ids_TLK[valid_TL].max() if valid_TL.any() else 0)
            if hi >= self.num_experts:
                raise StoreError(f"{where}: expected expert ids in [0, {self.num_experts}), got "
                                 f"{int(hi)}")

    @staticmethod
    def _check_start(request: Hashable, length: int, start: int, where: str) -> None:
        if start < length:
            raise StoreError(
                f"{where}: positions going backwards: the write starts at {start} but request "
                f"{request!r} already has {length} positions; call truncate({request!r}, "
                f"{start}) first to drop rejected rows, or restart() after a preemption")
        if start > length:
            raise StoreError(f"{where}: a gap: the write starts at {start} but request "
                             f"{request!r} has {length} positions (expected {length})")

    def write(self, request: Hashable, start: int, ids_TLK: np.ndarray,
              valid_TL: np.ndarray | None = None) -> None:
        """Store the rows of positions ``[start, start + T)``; ``start`` must be the length."""
        where = f"write({request!r})"
        req = self._get(request)
        self._check_rows(where, ids_TLK, valid_TL)
        self._check_start(request, req.length, start, where)
        self._put(req, start, ids_TLK, valid_TL)

    def ingest(self, ids_NLK: np.ndarray, valid_NL: np.ndarray | None,
               segments: Sequence[tuple[Hashable, int, int, int]]) -> None:
        """One engine step: ``segments`` of ``(request, start, first_row, num_rows)``.

        Rows ``[first_row, first_row + num_rows)`` of the step are positions
        ``[start, start + num_rows)`` of the request. Rows no segment names (padding, dummy
        tokens) are ignored. All segments are checked before any is stored.
        """
        self._check_rows("ingest", ids_NLK, valid_NL)
        N = ids_NLK.shape[0]
        reqs = self._reqs
        ends: dict[Hashable, int] = {}
        pieces = []
        for request, start, row, n in segments:
            req = reqs.get(request) if isinstance(request, Hashable) else None
            if req is None:
                self._get(request)  # raises the error naming the request
            length = ends.get(request, req.length)
            if start != length or n < 0 or row < 0 or row + n > N:
                if n < 0 or row < 0 or row + n > N:
                    raise StoreError(f"ingest: segment of {request!r} names rows [{row}, "
                                     f"{row + n}) of a step of {N} rows")
                self._check_start(request, length, start, "ingest")
            ends[request] = start + n
            pieces.append((req, start, row, n))
        self._scatter(ids_NLK, valid_NL, pieces)

    def _put(self, req: _Request, start: int, ids_TLK: np.ndarray,
             valid_TL: np.ndarray | None) -> None:
        self._scatter(ids_TLK, valid_TL, [(req, start, 0, ids_TLK.shape[0])])

    def _scatter(self, ids_NLK: np.ndarray, valid_NL: np.ndarray | None,
                 pieces: list[tuple[_Request, int, int, int]]) -> None:
        """Store rows ``[row, row + n)`` at positions ``[start, start + n)`` of each request.

        Blocks are resolved first (allocating, copying on write) and the rows then moved with
        one scatter. Blocks resolved in this call are pinned: an allocation that must evict one
        first flushes the rows gathered so far, so a reused block never receives stale rows.
        """
        P = self.block_size
        dst: list[int] = []  # first pool row of each piece
        src: list[int] = []  # first step row of each piece
        cnt: list[int] = []  # rows in each piece
        pinned = self._pinned

        def flush() -> None:
            if cnt:
                if len(cnt) == sum(cnt):  # one row per piece: decode steps
                    d = np.asarray(dst)
                    r = np.asarray(src)
                else:
                    m = np.asarray(cnt)
                    first = np.repeat(np.cumsum(m) - m, m)
                    run = np.arange(int(m.sum())) - first
                    d = np.repeat(np.asarray(dst), m) + run
                    r = np.repeat(np.asarray(src), m) + run
                self._ids_flat[d] = ids_NLK[r]
                self._valid_flat[d] = True if valid_NL is None else valid_NL[r]
                dst.clear()
                src.clear()
                cnt.clear()
            pinned.clear()

        self._flush = flush
        try:
            gen, refs, hashed = self._gen, self._refs, self._hash
            for req, start, row, n in pieces:
                end = start + n
                pos = start
                table = req.table
                while pos < end:
                    j, o = divmod(pos, P)
                    m = min(P - o, end - pos)
                    # fast path (every decode step): the request's own tail block, still alive
                    b = -1
                    if o and j < len(table):
                        b, g = table[j]
                        if b < 0 or gen[b] != g or refs[b] != 1 or b in hashed:
                            b = -1
                    if b < 0:
                        b = self._writable(req, j)
                    pinned.add(b)
                    dst.append(b * P + o)
                    src.append(row + pos - start)
                    cnt.append(m)
                    pos += m
                req.length = end
            flush()
        finally:
            self._flush = None
            pinned.clear()

    def publish(self, request: Hashable, block_hashes: Sequence[Hashable]) -> None:
        """Publish the request's full blocks under the engine's content hashes (idempotent).

        ``block_hashes[j]`` is the hash of block j; blocks past the request's full blocks are
        ignored (the engine may know hashes of blocks the store has not seen complete yet).
        """
        req = self._get(request)
        P = self.block_size
        full = min(req.length // P, len(block_hashes))
        for j in range(req.published, full):
            entry = req.table[j]
            h = block_hashes[j]
            if not self._alive(entry):
                continue  # evicted: nothing to publish
            b = entry[0]
            other = self._by_hash.get(h)
            if other is not None and other != b:
                if not (self._valid[b] & ~self._valid[other]).any():
                    # deduplicate: link to the block already published under this hash
                    self._ref(other)
                    req.table[j] = (other, int(self._gen[other]))
                    self._unref(entry)
                    continue
                # the published copy lost cells (an eviction) that this one has: publish ours
                # instead; the old one stays with the requests that hold it
                del self._hash[other]
                if self._refs[other] == 0:
                    self._release_storage(other)
                other = None
            if other is None and b not in self._hash:
                self._hash[b] = h
                self._by_hash[h] = b
        req.published = max(req.published, full)

    def truncate(self, request: Hashable, length: int) -> None:
        """Forget positions ``>= length`` (e.g. rejected speculative tokens)."""
        req = self._get(request)
        if not isinstance(length, (int, np.integer)) or not 0 <= length <= req.length:
            raise StoreError(f"truncate({request!r}, {length!r}): expected 0 <= length <= "
                             f"{req.length}")
        P = self.block_size
        keep = -(-length // P)
        for entry in req.table[keep:]:
            self._unref(entry)
        del req.table[keep:]
        j, o = divmod(length, P)
        if o and j < len(req.table) and self._alive(req.table[j]):
            b = self._writable(req, j)  # the partial block: drop its rows from `length` on
            self._valid[b, o:] = False
            self._lost[b, o:] = False
        req.length = length
        req.published = min(req.published, length // P)

    def free(self, request: Hashable) -> None:
        """The request finished or was aborted: release its blocks (published ones stay cached)."""
        req = self._get(request)
        for entry in req.table:
            self._unref(entry)
        del self._reqs[request]

    def clear(self) -> None:
        for r in list(self._reqs):
            self.free(r)

    # ---- reading ------------------------------------------------------------------------------
    def coverage(self, request: Hashable, start: int = 0, end: int | None = None) -> np.ndarray:
        """Per position: :data:`PRESENT`, :data:`EVICTED` or :data:`NOT_WRITTEN` (int8)."""
        req = self._get(request)
        end = req.length if end is None else end
        if not 0 <= start <= end:
            raise StoreError(f"coverage({request!r}): expected 0 <= start <= end, got {start}, "
                             f"{end}")
        P = self.block_size
        out = np.full(end - start, NOT_WRITTEN, np.int8)
        for pos in range(start, min(end, req.length)):
            j, o = divmod(pos, P)
            entry = req.table[j] if j < len(req.table) else None
            if entry is None or not self._alive(entry):
                out[pos - start] = EVICTED if entry is not None else NOT_WRITTEN
            elif self._valid[entry[0], o].any():
                out[pos - start] = PRESENT
            elif self._lost[entry[0], o]:
                out[pos - start] = EVICTED
        return out

    def take(self, request: Hashable, start: int = 0, end: int | None = None, *,
             token_ids: np.ndarray | None = None, request_id: str | None = None,
             prompt_len: int | None = None, extra: dict[str, Any] | None = None
             ) -> RoutingTrace:
        """The request's routes for positions ``[start, end)`` as a trace (one copy).

        ``end`` defaults to the request's length: prompt plus generated tokens minus the last,
        when the engine writes the rows of every forward. Positions whose block was evicted, or
        that were never written, are missing. ``token_ids`` (``[end - start]``) travel along.
        """
        req = self._get(request)
        end = req.length if end is None else end
        if not 0 <= start <= end:
            raise StoreError(f"take({request!r}): expected 0 <= start <= end, got {start}, {end}")
        P, L, K = self.block_size, self.num_layers, self.top_k
        T = end - start
        j0, j1 = start // P, -(-end // P)
        slots = np.zeros(max(0, j1 - j0), np.int64)
        alive = np.zeros(max(0, j1 - j0), np.bool_)
        for j in range(j0, j1):
            entry = req.table[j] if j < len(req.table) else None
            if entry is not None and self._alive(entry):
                slots[j - j0] = entry[0]
                alive[j - j0] = True
                self._touch(entry[0])
        o = start - j0 * P
        ids = self._ids[slots].reshape(-1, L, K)[o:o + T]  # the one gather copy
        valid = (self._valid[slots] & alive[:, None, None]).reshape(-1, L)[o:o + T]
        if end > req.length:
            valid[max(0, req.length - start):] = False
        missing = ~valid
        if missing.any():
            ids[missing] = 0
        else:
            missing = None
        tok = None
        if token_ids is not None:
            tok = np.asarray(token_ids, dtype=np.int32)
            if tok.shape != (T,):
                raise StoreError(f"take({request!r}): expected {T} token ids, got {tok.shape}")
        return RoutingTrace(expert_ids=ids, missing=missing, num_experts=self.num_experts,
                            moe_layers=self.moe_layers,
                            request_id=str(request) if request_id is None else request_id,
                            prompt_len=req.prompt_len if prompt_len is None else prompt_len,
                            start=start, model=self.model,
                            token_ids=tok, extra=extra or {})
