"""The block pool under :class:`routecap.store.RouteStore`: storage, references, LRU, hash index.

Shape legend: P block size (tokens per block), L MoE layers, K top-k, B blocks.

A block is ``P`` rows of ``[L, K]`` expert ids plus a validity mask ``[P, L]`` and a *lost* mark
per row (the row's routes existed once and were evicted before the block was rebuilt). Blocks are
handed out, referenced by request block tables, published under a content hash for prefix reuse,
and evicted least recently used first when room is needed: unreferenced published blocks before
blocks in use. A table entry names a block and the block's *generation*; releasing a block bumps
its generation, so every entry still naming it reads as stale (missing), never as someone else's
routes.

Room is made in one step, before anything is written: :meth:`BlockPool.reserve` evicts what it
must (never a pinned block: the blocks the caller is about to write or copy) and sets aside the
blocks the caller will fill, or raises before changing anything. Resolving a write then only
draws from the reservation, so eviction never runs in the middle of a half-done scatter.
"""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np

__all__ = ["BlockPool"]


class BlockPool:
    """``num_blocks`` blocks of ``[P, L, K]`` ids with refcounts, an LRU clock and a hash index.

    The pool does not know requests: callers reference blocks (:meth:`ref` / :meth:`unref`) and
    remember ``(block, generation)`` pairs. ``limit`` is how many blocks may be in use at once
    (the store lowers it as its request tables grow, so that both fit in one byte budget).
    """

    def __init__(self, *, num_blocks: int, block_size: int, num_layers: int, top_k: int,
                 dtype: np.dtype) -> None:
        B, P, L, K = num_blocks, block_size, num_layers, top_k
        self.num_blocks, self.block_size = B, P
        # NOTE: np.zeros maps fresh pages lazily: memory is committed as blocks are first used.
        self.ids = np.zeros((B, P, L, K), dtype)
        self.valid = np.zeros((B, P, L), np.bool_)
        self.lost = np.zeros((B, P), np.bool_)
        # generation and last use (the clock) per block: rows of one array (one argument of the
        # store's compiled step), each also an attribute (a view)
        self.gen_use = np.zeros((2, B), np.int64)
        self.gen = self.gen_use[0]
        self.refs = np.zeros(B, np.int32)
        self.last_use = self.gen_use[1]
        self.published = np.zeros(B, np.bool_)
        self.in_use_mask = np.zeros(B, np.bool_)
        self.hash_of: dict[int, Hashable] = {}
        self.by_hash: dict[Hashable, int] = {}
        # a stack; a slice off its top is ascending blocks (a prefill's blocks in memory order,
        # so that its rows are copied as one run)
        self._free = np.arange(B, dtype=np.int64)
        self._nfree = B
        self._reserved: list[int] = []
        self.limit = B
        self.clock = 1
        self.evictions = 0
        # flat views: one row per (block, position), for the scatter/gather of whole rows
        self.ids_rows = self.ids.reshape(B * P, L * K)
        self.valid_rows = self.valid.reshape(B * P, L)
        self.ids_cells = self.ids.reshape(B * P * L, K)

    # ---- state ---------------------------------------------------------------------------------
    @property
    def in_use(self) -> int:
        return self.num_blocks - self._nfree

    def alive(self, b: int, g: int) -> bool:
        return b >= 0 and self.gen[b] == g

    def private(self, b: int) -> bool:
        """Block b is referenced once and not published: its holder may write into it."""
        return self.refs[b] == 1 and not self.published[b]

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    # ---- room ----------------------------------------------------------------------------------
    def _victims(self, count: int, pinned: np.ndarray) -> np.ndarray:
        """The ``count`` blocks to evict: unreferenced first, then least recently used."""
        cand = self.in_use_mask.copy()
        if pinned.size:
            cand[pinned] = False
        idx = np.flatnonzero(cand)
        if idx.size < count:
            return idx[:0] if count else idx
        # rank: referenced blocks after every unreferenced one, each group by last use
        key = self.last_use[idx] + (self.refs[idx] > 0) * (1 << 62)
        if count < idx.size:
            sel = np.argpartition(key, count - 1)[:count]
        else:
            sel = np.arange(idx.size)
        return idx[sel]

    def can_reserve(self, count: int, pinned: np.ndarray, *, limit: int | None = None) -> bool:
        limit = self.limit if limit is None else limit
        over = self.in_use + len(self._reserved) + count - limit
        if over <= 0:
            return True
        cand = self.in_use_mask.copy()
        if pinned.size:
            cand[pinned] = False
        return int(cand.sum()) >= over

    def reserve(self, count: int, pinned: np.ndarray) -> None:
        """Set ``count`` blocks aside for :meth:`take`, evicting unpinned blocks if needed.

        The caller checks :meth:`can_reserve` first (so that a refusal changes nothing).
        """
        over = self.in_use + len(self._reserved) + count - self.limit
        if over > 0:
            victims = self._victims(over, pinned)
            assert victims.size == over, "reserve() without can_reserve()"
            for b in victims.tolist():
                self.release(b)
                self.evictions += 1
        n = self._nfree
        self._reserved.extend(self._free[n - count:n].tolist())
        self._nfree -= count

    def shrink_to_limit(self, pinned: np.ndarray) -> None:
        """Evict until at most ``limit`` blocks are in use (after the limit was lowered)."""
        over = self.in_use - self.limit
        if over > 0:
            victims = self._victims(over, pinned)
            assert victims.size == over, "shrink_to_limit() without can_reserve()"
            for b in victims.tolist():
                self.release(b)
                self.evictions += 1

    def take(self) -> int:
        """A fresh block from the reservation, referenced once, all rows invalid."""
        b = self._reserved.pop()
        self.valid[b] = False
        self.lost[b] = False
        self.refs[b] = 1
        self.in_use_mask[b] = True
        self.clock += 1  # blocks taken in one call: the earlier position is the older use
        self.last_use[b] = self.clock
        return b

    def take_many(self, count: int) -> np.ndarray:
        """``count`` fresh blocks at once (see :meth:`take`)."""
        if not count:
            return np.zeros(0, np.int64)
        bs = np.array(self._reserved[len(self._reserved) - count:], np.int64)
        del self._reserved[len(self._reserved) - count:]
        self._mark_taken(bs)
        return bs

    @property
    def free_stack(self) -> tuple[np.ndarray, int]:
        """The free stack and its depth, for a compiled caller that takes from its top (see
        :meth:`took_top`)."""
        return self._free, self._nfree

    def took_top(self, count: int) -> np.ndarray:
        """Account for ``count`` blocks that a compiled caller took from the top of the free stack
        (``free[nfree - count:nfree]``, in that order) and marked as :meth:`take_many` marks them
        (referenced once, in use, not lost, the i-th last used at ``clock + 1 + i``); returns
        them (a copy). The caller checked that they fit under the limit without an eviction.
        """
        assert self.in_use + len(self._reserved) + count <= self.limit, "took_top() over limit"
        n = self._nfree
        bs = self._free[n - count:n].copy()
        self._nfree = n - count
        self.clock += count
        return bs

    def _mark_taken(self, bs: np.ndarray) -> None:
        self.valid[bs] = False
        self.lost[bs] = False
        self.refs[bs] = 1
        self.in_use_mask[bs] = True
        self.last_use[bs] = self.clock + 1 + np.arange(bs.shape[0])
        self.clock += bs.shape[0]

    def unreserve(self) -> None:
        """Give back what a reservation did not use."""
        for b in self._reserved:
            self._free[self._nfree] = b
            self._nfree += 1
        self._reserved.clear()

    # ---- references ----------------------------------------------------------------------------
    def ref(self, b: int) -> None:
        self.refs[b] += 1
        self.last_use[b] = self.clock

    def unref(self, b: int, g: int) -> None:
        """Drop one reference to (b, g) if it is still alive; a private block is freed at once."""
        if b < 0 or self.gen[b] != g:
            return
        self.refs[b] -= 1
        if self.refs[b] == 0 and not self.published[b]:
            self.release(b)

    def unref_many(self, bs: np.ndarray, gs: np.ndarray) -> None:
        """:meth:`unref` of each ``(bs[i], gs[i])`` (blocks >= 0), as one pass: the private blocks
        that lose their last reference are freed in the order of ``bs``."""
        bs = bs[self.gen[bs] == gs]
        if not bs.size:
            return
        np.subtract.at(self.refs, bs, 1)
        gone = bs[(self.refs[bs] == 0) & ~self.published[bs]]
        if gone.size:
            _, first = np.unique(gone, return_index=True)
            gone = gone[np.sort(first)]  # (a block named twice is freed once)
            self.gen[gone] += 1
            self.in_use_mask[gone] = False
            self._free[self._nfree:self._nfree + gone.size] = gone
            self._nfree += gone.size

    def release(self, b: int) -> None:
        """Free block b now: every table entry still naming it becomes stale."""
        if self.published[b]:
            h = self.hash_of.pop(b)
            if self.by_hash.get(h) == b:
                del self.by_hash[h]
            self.published[b] = False
        self.refs[b] = 0
        self.gen[b] += 1
        self.in_use_mask[b] = False
        self._free[self._nfree] = b
        self._nfree += 1

    # ---- hash index ----------------------------------------------------------------------------
    def publish(self, b: int, h: Hashable) -> None:
        self.hash_of[b] = h
        self.by_hash[h] = b
        self.published[b] = True

    def unpublish(self, b: int) -> None:
        """Take block b out of the hash index (its holders keep it; freed when they let go)."""
        h = self.hash_of.pop(b)
        if self.by_hash.get(h) == b:
            del self.by_hash[h]
        self.published[b] = False
        if self.refs[b] == 0:
            self.release(b)

    def copy_block(self, dst: int, src: int) -> None:
        self.ids[dst] = self.ids[src]
        self.valid[dst] = self.valid[src]
        self.lost[dst] = self.lost[src]

    # ---- checks --------------------------------------------------------------------------------
    def check_invariants(self, expected_refs: np.ndarray) -> None:
        """Raise AssertionError if the pool's bookkeeping disagrees with itself or the callers.

        ``expected_refs[b]``: how many live table entries name block b (counted by the store).
        """
        free = self._free[:self._nfree]
        assert np.bincount(free, minlength=self.num_blocks).max(initial=0) <= 1, \
            "a block is on the free stack twice"
        assert not self.in_use_mask[free].any(), "a free block is marked in use"
        assert not self._reserved, "a reservation outlived its call"
        assert int(self.in_use_mask.sum()) == self.in_use, "in-use count disagrees with the mask"
        assert self.in_use <= self.limit, f"{self.in_use} blocks in use, limit {self.limit}"
        assert (self.refs >= 0).all(), "a negative refcount"
        assert (self.refs[~self.in_use_mask] == 0).all(), "a free block has references"
        bad = np.flatnonzero(self.refs != expected_refs)
        assert not bad.size, (f"block {int(bad[0])}: refcount {int(self.refs[bad[0]])}, table "
                              f"entries naming it {int(expected_refs[bad[0]])}")
        leaked = np.flatnonzero(self.in_use_mask & (self.refs == 0) & ~self.published)
        assert not leaked.size, f"block {int(leaked[0])} is in use, unreferenced, unpublished"
        assert not self.published[~self.in_use_mask].any(), "a free block is published"
        assert int(self.published.sum()) == len(self.hash_of), "published mask vs hash_of"
        for h, b in self.by_hash.items():
            assert self.hash_of.get(b) == h, f"hash index: {h!r} -> block {b} -> {self.hash_of.get(b)!r}"
