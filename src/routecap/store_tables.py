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
from typing import Any

import numpy as np

from .block_pool import BlockPool

__all__ = ["RequestTables", "StoreError", "TableSlab", "is_int"]

# table entries that name no block
_LOST = -1  # the engine had the block, the store had evicted it (or the block was evicted later)
_GAP = -2  # never written (a seek past the end)
_WAIT = -3  # a prefix-cache hit on a hash not published yet
_REQUEST_BYTES = 512  # per request: its record, dict entries and array headers (an upper bound)
_ENTRY_BYTES = 16  # per block-table slot: block (int64) and generation (int64)
_WAIT_BYTES = 512  # per entry waiting on a hash: its place in two dicts (an upper bound)


#: rows of :attr:`RequestTables.slot_state` (int64 ``[9, slots]``)
(SLOT_SERIAL, SLOT_LIVE, SLOT_LENGTH, SLOT_TAIL_B, SLOT_TAIL_G, SLOT_CAP, SLOT_MARK, SLOT_OFF,
 SLOT_NBLOCKS) = range(9)
SLOT_ROWS = 9


def _new_slot_state(n: int) -> np.ndarray:
    st = np.zeros((SLOT_ROWS, n), np.int64)
    st[SLOT_TAIL_B] = -1
    st[SLOT_MARK] = -1
    return st


def is_int(x: Any) -> bool:
    """An integer, not a bool (numpy integers included)."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


class StoreError(KeyError, ValueError):
    """A call the store cannot honour (unknown request, positions going backwards, bad shape)."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class _Request:
    """A request's table: ``blocks``/``gens`` are views of its region of the tables' slab
    (:class:`TableSlab`); its length, tail and entry count live in the slot arrays."""

    __slots__ = ("key", "slot", "prompt_len", "blocks", "gens", "published", "waits", "_state")

    def __init__(self, key: Hashable, slot: int, prompt_len: int, tables: RequestTables) -> None:
        self.key, self.slot, self.prompt_len = key, slot, prompt_len
        self.blocks: np.ndarray  # int64 [capacity]: block per entry, or _LOST / _GAP / _WAIT
        self.gens: np.ndarray  # int64 [capacity]: the block's generation when the entry was made
        self.published = 0  # leading full blocks already published
        self.waits: dict[int, Hashable] = {}  # entry -> the hash it waits for
        self._state = tables  # (its slot_state is reallocated when the slots grow)

    @property
    def nblocks(self) -> int:
        """Entries in use (``[0, nblocks)``; the rest are gaps)."""
        return int(self._state.slot_state[SLOT_NBLOCKS, self.slot])

    @nblocks.setter
    def nblocks(self, n: int) -> None:
        self._state.slot_state[SLOT_NBLOCKS, self.slot] = n

    @property
    def capacity(self) -> int:
        return self.blocks.shape[0]


class TableSlab:
    """Every request's table entries in one array, so that a compiled step can write them.

    ``entries[0]`` holds blocks (or ``_LOST``/``_GAP``/``_WAIT``), ``entries[1]`` generations.
    A request owns the region ``[off, off + capacity)`` (slot arrays ``SLOT_OFF``/``SLOT_CAP``);
    a table that grows moves to a new region at the end, a freed one leaves its region behind,
    and when the end is reached the live regions are packed into a new array of four times their
    size (every request's views are rebound then: never keep ``req.blocks`` across
    :meth:`RequestTables.new_request` or :meth:`RequestTables.grow`).

    The budget counts each table's capacity (16 bytes an entry); the slab's slack around them
    (at most 3 times the live entries, plus regions left behind until the next pack: 16 bytes
    per entry, against the ~6 KB of routes one entry's block holds at 48 layers x top-8) is
    not counted.
    """

    MIN_SIZE = 1024  # entries (tests lower it, to pack often)

    def __init__(self) -> None:
        self.entries = np.zeros((2, self.MIN_SIZE), np.int64)
        self.entries[0] = _GAP
        self.end = 0  # regions are handed out from here
        self.live = 0  # entries owned by live requests

    def place(self, tables: RequestTables, req: _Request, cap: int) -> None:
        """Give ``req`` a region of ``cap`` entries, its current entries copied (if any)."""
        st = tables.slot_state
        old = int(st[SLOT_CAP, req.slot]) if st[SLOT_LIVE, req.slot] else 0  # (0: registering)
        if self.end + cap > self.entries.shape[1]:
            self._pack(tables, cap)
        off = self.end
        self.end += cap
        region = self.entries[:, off:off + cap]
        if old:
            o = int(st[SLOT_OFF, req.slot])
            region[:, :old] = self.entries[:, o:o + old]
        region[0, old:] = _GAP
        region[1, old:] = 0
        self.live += cap - old
        st[SLOT_OFF, req.slot] = off
        st[SLOT_CAP, req.slot] = cap
        req.blocks, req.gens = region[0], region[1]

    def moved(self, tables: RequestTables, slots: list[int], end: int, grown: int) -> None:
        """The compiled step moved the tables of ``slots`` to new regions (``SLOT_OFF``,
        ``SLOT_CAP``) that end at ``end``, adding ``grown`` entries: their views rebound."""
        st = tables.slot_state
        self.end = end
        self.live += grown
        for slot in slots:
            req = tables.by_slot[slot]
            off, cap = int(st[SLOT_OFF, slot]), int(st[SLOT_CAP, slot])
            req.blocks, req.gens = self.entries[0, off:off + cap], self.entries[1, off:off + cap]

    def drop(self, req: _Request) -> None:
        self.live -= req.capacity

    def _pack(self, tables: RequestTables, extra: int) -> None:
        st = tables.slot_state
        packed = np.zeros((2, max(self.MIN_SIZE, 4 * (self.live + extra))), np.int64)
        packed[0] = _GAP
        end = 0
        for req in tables.reqs.values():  # (a request being registered is placed after)
            cap, o = req.capacity, int(st[SLOT_OFF, req.slot])
            packed[:, end:end + cap] = self.entries[:, o:o + cap]
            st[SLOT_OFF, req.slot] = end
            req.blocks, req.gens = packed[0, end:end + cap], packed[1, end:end + cap]
            end += cap
        self.entries, self.end = packed, end

    def check(self, tables: RequestTables) -> None:
        st, live = tables.slot_state, 0
        for key, req in tables.reqs.items():
            off, cap = int(st[SLOT_OFF, req.slot]), int(st[SLOT_CAP, req.slot])
            assert req.capacity == cap and off + cap <= self.end, (key, off, cap, self.end)
            assert req.blocks.base is self.entries and req.gens.base is self.entries, key
            assert np.shares_memory(req.blocks, self.entries[0, off:off + cap]), key
            assert np.shares_memory(req.gens, self.entries[1, off:off + cap]), key
            live += cap
        assert live == self.live, (live, self.live)


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
        # per-request arrays by slot, for the compiled step: rows of one array (one argument of
        # the step's compiled call, not seven), each also an attribute (a view)
        self.slot_state = _new_slot_state(64)
        self._bind_slot_state()
        self.free_slots: list[int] = list(range(63, -1, -1))
        self.slab = TableSlab()
        self.waiting: dict[Hashable, dict[int, _Request]] = {}  # hash -> {slot: request}

    def new_request(self, key: Hashable, prompt_len: int, entries: int) -> _Request:
        """Register a request (room for its table was made by the caller)."""
        if not self.free_slots:
            self.grow_slots()
        slot = self.free_slots.pop()
        req = _Request(key, slot, prompt_len, self)
        self.slab.place(self, req, _capacity_for(max(entries, 1)))
        self.reqs[key] = req
        self.slot_of[key] = slot
        self.by_slot[slot] = req
        self.live[slot] = 1
        self.length[slot] = 0
        self.tail_b[slot] = -1
        self.slot_state[SLOT_NBLOCKS, slot] = 0
        return req

    def release(self, req: _Request) -> None:
        """Drop the request: its blocks unreferenced, its waits cancelled, its bytes returned."""
        self.drop_entries(req, 0)
        self.slab.drop(req)
        del self.reqs[req.key]
        del self.slot_of[req.key]
        self.by_slot[req.slot] = None
        self.live[req.slot] = 0
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
        self.slab.place(self, req, _capacity_for(need))

    @staticmethod
    def growth_bytes(req: _Request | None, need: int) -> int:
        cap = 0 if req is None else req.capacity
        return 0 if need <= cap else (_capacity_for(need) - cap) * _ENTRY_BYTES

    def drop_entries(self, req: _Request, keep: int) -> None:
        """Release table entries ``>= keep`` (blocks unreferenced, waits cancelled)."""
        nb = req.nblocks
        if keep < nb:
            b = req.blocks[keep:nb]
            if req.waits:
                for j in (np.flatnonzero(b == _WAIT) + keep).tolist():
                    self.cancel_wait(req, j)
            real = b >= 0
            self.pool.unref_many(b[real], req.gens[keep:nb][real])
            req.blocks[keep:nb] = _GAP
            req.nblocks = keep
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
        n = self.slot_state.shape[1]
        grown = _new_slot_state(2 * n)
        grown[:, :n] = self.slot_state
        self.slot_state = grown
        self._bind_slot_state()
        self.free_slots.extend(range(2 * n - 1, n - 1, -1))
        self.by_slot.extend([None] * n)

    def _bind_slot_state(self) -> None:
        st = self.slot_state
        self.serial = st[SLOT_SERIAL]  # bumped when a slot's request is freed
        self.live = st[SLOT_LIVE]  # 1 while a request holds the slot
        self.length = st[SLOT_LENGTH]
        self.tail_b = st[SLOT_TAIL_B]  # the private tail block (-1: none cached)
        self.tail_g = st[SLOT_TAIL_G]  # and its generation
        self.cap = st[SLOT_CAP]  # table capacity
        self.mark = st[SLOT_MARK]  # scratch for classify_segments (-1)

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
        self.slab.check(self)
        nbytes = pool.in_use * self.block_bytes + self.table_bytes
        assert nbytes <= self.budget_bytes, (nbytes, self.budget_bytes)
        pool.check_invariants(expected)


