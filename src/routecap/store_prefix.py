"""Prefix-cache attachment of :class:`~routecap.store.RouteStore`: block hashes to table entries.

A full block is *published* under the chained content hash the engine gives it; a later request
whose prefix hits the engine's cache is *attached* to the published blocks of its hashes without
a forward. A hit on a hash not published yet (a same-step hit: the engine marks blocks cached when
they are scheduled) makes the table entry *wait* on the hash (:data:`~routecap.store_tables._WAIT`);
publishing the hash, by whichever request, wakes every entry waiting on it.

The waits themselves are table entries and are kept by :class:`~routecap.store_tables.RequestTables`
(which cancels them when entries are dropped); this module holds what goes through a hash: the
arguments of a prefix hit, attaching, publishing, deduplication and conflict detection, waking.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from .block_pool import BlockPool
from .store_tables import _WAIT, _WAIT_BYTES, RequestTables, StoreError, _Request, is_int

__all__ = ["PrefixIndex", "cached_hashes", "check_hashable"]


def check_hashable(where: str, hashes: list[Hashable]) -> None:
    """Raise :class:`StoreError` naming the first block hash that is not hashable."""
    for j, h in enumerate(hashes):
        try:
            hash(h)
        except TypeError:
            raise StoreError(f"{where}: block hashes must be hashable, got "
                             f"{type(h).__name__} {h!r} at block {j}") from None


def cached_hashes(where: str, n: Any, hashes: Sequence[Hashable], block_size: int
                  ) -> list[Hashable]:
    """The hashes of a prefix hit of ``n`` cached tokens, checked (nothing changed on refusal)."""
    P = block_size
    if not is_int(n) or n < 0 or n % P:
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
    check_hashable(where, out)
    return out


class PrefixIndex:
    """Attach requests to published blocks by hash, publish blocks, wake waiting entries."""

    def __init__(self, tables: RequestTables, *, strict: bool = False) -> None:
        self.tables = tables
        self.pool: BlockPool = tables.pool
        self.block_size = tables.block_size
        self.strict = strict
        self.conflicts = 0  # hashes published twice with rows that disagree

    def wait_bytes(self, hashes: list[Hashable]) -> int:
        """Table bytes the waits of a prefix hit on ``hashes`` will take."""
        by_hash = self.pool.by_hash
        return _WAIT_BYTES * sum(h not in by_hash for h in hashes)

    def hit_blocks(self, hashes: list[Hashable]) -> np.ndarray:
        """The published blocks of ``hashes`` (to pin while room is made for a prefix hit)."""
        by_hash = self.pool.by_hash
        return np.array([by_hash[h] for h in hashes if h in by_hash], np.int64)

    def attach(self, req: _Request, hashes: list[Hashable]) -> int:
        """Entries ``[0, len(hashes))`` of ``req`` name the hashes' blocks, or wait on them.

        Returns how many positions have routes now.
        """
        t, pool, P = self.tables, self.pool, self.block_size
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
                t.waiting.setdefault(h, {})[req.slot] = req
        req.nblocks = len(hashes)
        t.length[req.slot] = len(hashes) * P
        req.published = len(hashes)
        t.tail_b[req.slot] = -1
        return have

    def publish(self, where: str, req: _Request, todo: list[Hashable], full: int) -> None:
        """Publish entries ``[req.published, full)`` under ``todo``.

        A hash already published for another block links to it (deduplication) when that block
        is at least as complete, replaces it when it lost cells ours has, and is a *conflict*
        (both keep their rows; counted in :attr:`conflicts`, raised if ``strict``) when the rows
        disagree. Waits on a newly published hash are linked to it.
        """
        pool = self.pool
        if self.strict:
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
                    self.conflicts += 1  # keep our own rows, unpublished
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
                self.wake(h, b)
        req.published = max(req.published, full)

    def _disagree(self, a: int, b: int) -> bool:
        pool = self.pool
        both = pool.valid[a] & pool.valid[b]
        return bool((pool.ids[a][both] != pool.ids[b][both]).any())

    def wake(self, h: Hashable, b: int) -> None:
        """Link every entry waiting on hash h to block b."""
        t = self.tables
        waiters = t.waiting.pop(h, None)
        if not waiters:
            return
        pool = self.pool
        for req in waiters.values():
            for j in [j for j, h2 in req.waits.items() if h2 == h]:
                del req.waits[j]
                t.table_bytes -= _WAIT_BYTES
                pool.ref(b)
                req.blocks[j] = b
                req.gens[j] = pool.gen[b]
        pool.limit = t.limit_for(t.table_bytes)
