"""Request block tables of :class:`~routecap.store.RouteStore` over a :class:`BlockPool`.

Shape legend: P block size (tokens per block); S segments of one step.

One table per request: entry j names the block holding positions ``[j*P, (j+1)*P)`` and the
block's generation, or says that there is no block: lost to an eviction, never written (a gap),
or *waiting* on a hash not published yet (a same-step prefix hit). Per-request state the
compiled step needs (length, tail block, table capacity) lives in arrays indexed by the
request's *slot*. The tables share the store's byte budget with the pool: their bytes lower the
pool's block limit (:meth:`RequestTables.make_room`). The edits a table entry can undergo live
here: grown, dropped (blocks unreferenced, waits cancelled), cut inside a block, made writable
(copy on write, a fresh block for an evicted one). What a step writes is resolved by
:mod:`routecap.store_ingest`; what goes through a block hash, by :mod:`routecap.store_prefix`.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .block_pool import BlockPool

__all__ = ["RequestTables", "StoreError", "is_int"]

# table entries that name no block
_LOST = -1  # the engine had the block, the store had evicted it (or the block was evicted later)
_GAP = -2  # never written (a seek past the end)
_WAIT = -3  # a prefix-cache hit on a hash not published yet
_REQUEST_BYTES = 512  # per request: its record, dict entries and array headers (an upper bound)
_ENTRY_BYTES = 16  # per block-table slot: block (int64) and generation (int64)
_WAIT_BYTES = 512  # per entry waiting on a hash: its place in two dicts (an upper bound)


def is_int(x: Any) -> bool:
    """An integer, not a bool (numpy integers included)."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


class StoreError(KeyError, ValueError):
    """A call the store cannot honour (unknown request, positions going backwards, bad shape)."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


@dataclass(eq=False)
class _Request:
    key: Hashable
    slot: int  # row of the per-request arrays (length, tail block, capacity)
    prompt_len: int
    blocks: np.ndarray  # int64 [capacity]: block per entry, or _LOST / _GAP / _WAIT
    gens: np.ndarray  # int64 [capacity]: the block's generation when the entry was made
    nblocks: int = 0
    published: int = 0  # leading full blocks already published
    waits: dict[int, Hashable] = field(default_factory=dict)  # entry -> the hash it waits for

    @property
    def capacity(self) -> int:
        return self.blocks.shape[0]


def _capacity_for(n: int) -> int:
    c = 4
    while c < n:
        c *= 2
    return c


class RequestTables:
    """Every request's block table, its per-slot state, the waits on hashes, the table bytes."""

    def __init__(self, pool: BlockPool, *, block_bytes: int, budget_bytes: int) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self.block_bytes = block_bytes
        self.budget_bytes = budget_bytes
        self.num_blocks = pool.num_blocks
        self.reqs: dict[Hashable, _Request] = {}
        self.slot_of: dict[Hashable, int] = {}
        self.by_slot: list[_Request | None] = [None] * 64
        self.table_bytes = 0
        # per-request arrays by slot, for the compiled step: length, tail block and generation
        self.length = np.zeros(64, np.int64)
        self.tail_b = np.full(64, -1, np.int64)
        self.tail_g = np.zeros(64, np.int64)
        self.cap = np.zeros(64, np.int64)  # table capacity
        self.mark = np.full(64, -1, np.int64)  # scratch for classify_segments
        self.serial = np.zeros(64, np.int64)  # bumped when a slot's request is freed
        self.live = np.zeros(64, np.bool_)
        self.free_slots: list[int] = list(range(63, -1, -1))
        self.waiting: dict[Hashable, dict[int, _Request]] = {}  # hash -> {slot: request}

    def new_request(self, key: Hashable, prompt_len: int, entries: int) -> _Request:
        """Register a request (room for its table was made by the caller)."""
        if not self.free_slots:
            self.grow_slots()
        slot = self.free_slots.pop()
        cap = _capacity_for(max(entries, 1))
        req = _Request(key=key, slot=slot, prompt_len=prompt_len,
                       blocks=np.full(cap, _GAP, np.int64), gens=np.zeros(cap, np.int64))
        self.reqs[key] = req
        self.slot_of[key] = slot
        self.by_slot[slot] = req
        self.live[slot] = True
        self.cap[slot] = cap
        self.length[slot] = 0
        self.tail_b[slot] = -1
        return req

    def release(self, req: _Request) -> None:
        """Drop the request: its blocks unreferenced, its waits cancelled, its bytes returned."""
        self.drop_entries(req, 0)
        del self.reqs[req.key]
        del self.slot_of[req.key]
        self.by_slot[req.slot] = None
        self.live[req.slot] = False
        self.serial[req.slot] += 1
        self.table_bytes -= _REQUEST_BYTES + req.capacity * _ENTRY_BYTES
        self.free_slots.append(req.slot)
        self.pool.limit = self.limit_for(self.table_bytes)

    def get(self, request: Hashable) -> _Request:
        try:
            return self.reqs[request]
        except (KeyError, TypeError):
            raise StoreError(f"unknown request {request!r}; the store holds {len(self.reqs)} "
                             "requests") from None

    def limit_for(self, table_bytes: int) -> int:
        return self.num_blocks - -(-table_bytes // self.block_bytes)

    def make_room(self, where: str, new_blocks: int, table_growth: int,
                   pinned: np.ndarray) -> None:
        """Check that ``new_blocks`` blocks and ``table_growth`` table bytes fit, then reserve.

        Raises (changing nothing) if they cannot fit even after evicting every unpinned block.
        """
        pool = self.pool
        limit = self.limit_for(self.table_bytes + table_growth)
        if limit < 0 or not pool.can_reserve(new_blocks, pinned, limit=limit):
            raise StoreError(
                f"{where}: the budget of {self.budget_bytes} bytes cannot hold what this call "
                f"needs: {new_blocks} new blocks of {self.block_bytes} bytes next to "
                f"{len(pinned)} blocks this call uses and {self.table_bytes + table_growth} bytes "
                f"of block tables for {len(self.reqs)} requests; raise budget_bytes or free "
                "requests")
        self.table_bytes += table_growth
        pool.limit = limit
        pool.shrink_to_limit(pinned)
        pool.reserve(new_blocks, pinned)

    def fits_without_eviction(self, new_blocks: int, table_growth: int) -> bool:
        """``new_blocks`` and ``table_growth`` table bytes fit with no block evicted."""
        return self.limit_for(self.table_bytes + table_growth) >= self.pool.in_use + new_blocks

    def grow(self, req: _Request, need: int) -> None:
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
        self.cap[req.slot] = new

    @staticmethod
    def growth_bytes(req: _Request | None, need: int) -> int:
        cap = 0 if req is None else req.capacity
        return 0 if need <= cap else (_capacity_for(need) - cap) * _ENTRY_BYTES

    def drop_entries(self, req: _Request, keep: int) -> None:
        """Release table entries ``>= keep`` (blocks unreferenced, waits cancelled)."""
        pool = self.pool
        for j in range(keep, req.nblocks):
            b = int(req.blocks[j])
            if b >= 0:
                pool.unref(b, int(req.gens[j]))
            elif b == _WAIT:
                self.cancel_wait(req, j)
        req.blocks[keep:req.nblocks] = _GAP
        req.nblocks = min(req.nblocks, keep)
        self.tail_b[req.slot] = -1

    def cancel_wait(self, req: _Request, j: int) -> None:
        h = req.waits.pop(j)
        self.table_bytes -= _WAIT_BYTES
        self.pool.limit = self.limit_for(self.table_bytes)
        if not any(h2 == h for h2 in req.waits.values()):
            waiters = self.waiting.get(h)
            if waiters is not None:
                waiters.pop(req.slot, None)
                if not waiters:
                    del self.waiting[h]

    def grow_slots(self) -> None:
        n = self.length.shape[0]
        self.length = np.concatenate([self.length, np.zeros(n, np.int64)])
        self.tail_b = np.concatenate([self.tail_b, np.full(n, -1, np.int64)])
        self.tail_g = np.concatenate([self.tail_g, np.zeros(n, np.int64)])
        self.cap = np.concatenate([self.cap, np.zeros(n, np.int64)])
        self.serial = np.concatenate([self.serial, np.zeros(n, np.int64)])
        self.live = np.concatenate([self.live, np.zeros(n, np.bool_)])
        self.mark = np.concatenate([self.mark, np.full(n, -1, np.int64)])
        self.free_slots.extend(range(2 * n - 1, n - 1, -1))
        self.by_slot.extend([None] * n)

    def sync_tail(self, req: _Request, length: int) -> None:
        j, o = divmod(length, self.block_size)
        slot = req.slot
        if o and j < req.nblocks and req.blocks[j] >= 0:
            self.tail_b[slot] = req.blocks[j]
            self.tail_g[slot] = req.gens[j]
        else:
            self.tail_b[slot] = -1

    def cut(self, req: _Request, length: int, old: int) -> None:
        """Forget positions ``>= length`` (``old`` is the current length)."""
        P = self.block_size
        keep = -(-length // P)
        self.drop_entries(req, keep)
        j, o = divmod(length, P)
        if o and j < req.nblocks:
            b = int(req.blocks[j])
            if b >= 0 and self.pool.gen[b] == req.gens[j]:
                b = self.writable(req, j, old)  # the partial block: drop its rows from o on
                self.pool.valid[b, o:] = False
                self.pool.lost[b, o:] = False
        self.length[req.slot] = length
        req.published = min(req.published, length // P)
        self.sync_tail(req, length)

    def writable(self, req: _Request, j: int, length: int) -> int:
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
                    self.cancel_wait(req, j)
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

    def entries(self, req: _Request, j0: int, j1: int) -> tuple[np.ndarray, np.ndarray]:
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

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (for tests and simulators).

        Checks every table against the pool (refcounts), the waits in both directions, the tail
        cache and the byte accounting.
        """
        pool, P = self.pool, self.block_size
        expected = np.zeros(pool.num_blocks, np.int64)
        table_bytes = 0
        slots = set()
        waits = 0
        for key, req in self.reqs.items():
            assert req.slot not in slots, f"slot {req.slot} used twice"
            slots.add(req.slot)
            table_bytes += (_REQUEST_BYTES + req.capacity * _ENTRY_BYTES
                            + _WAIT_BYTES * len(req.waits))
            length = int(self.length[req.slot])
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
                assert req.slot in self.waiting.get(h, {}), f"{key!r} waits on {h!r} unlisted"
                assert h not in pool.by_hash, f"{key!r} waits on published {h!r}"
            waits += len(req.waits)
            # rows at or past the length of an alive private tail block are invalid
            j, o = divmod(length, P)
            if o and j < req.nblocks and alive[j] and pool.private(int(b[j])):
                assert not pool.valid[b[j], o:].any(), f"{key!r}: valid rows past the length"
            tb = int(self.tail_b[req.slot])
            if tb >= 0:
                assert o and j < req.nblocks and tb == b[j] and self.tail_g[req.slot] == g[j], \
                    f"{key!r}: stale tail cache"
            assert req.published <= length // P, f"{key!r}: published past the full blocks"
        for h, waiters in self.waiting.items():
            for slot, req in waiters.items():
                assert self.reqs.get(req.key) is req and req.slot == slot, "a stale waiter"
                assert h in req.waits.values(), f"listed waiter does not wait on {h!r}"
        assert table_bytes == self.table_bytes, (table_bytes, self.table_bytes)
        assert pool.limit == self.limit_for(table_bytes), (pool.limit, table_bytes)
        nbytes = pool.in_use * self.block_bytes + self.table_bytes
        assert nbytes <= self.budget_bytes, (nbytes, self.budget_bytes)
        pool.check_invariants(expected)


