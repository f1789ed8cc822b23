"""BlockPool: the batch release of a table's entries against one unref at a time."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from routecap.block_pool import BlockPool


def _pool(rng, B=64):
    pool = BlockPool(num_blocks=B, block_size=2, num_layers=1, top_k=2, dtype=np.dtype(np.uint8))
    pool.reserve(int(rng.integers(B // 2, B)), np.zeros(0, np.int64))
    bs = pool.take_many(len(pool._reserved))
    for b in bs.tolist():  # more references, some published, some released (stale gens)
        for _ in range(int(rng.integers(0, 3))):
            pool.ref(b)
        if rng.random() < 0.2:
            pool.publish(b, f"h{b}")
    for b in rng.choice(bs, 4, replace=False).tolist():
        pool.release(b)
    return pool, bs


@pytest.mark.parametrize("seed", range(30))
def test_unref_many_is_unref_of_each(seed):
    rng = np.random.default_rng(seed)
    pool, bs = _pool(rng)
    picks = rng.choice(bs, int(rng.integers(0, len(bs))), replace=False)
    gens = pool.gen[picks] - (rng.random(picks.size) < 0.1)  # some entries stale
    one = copy.deepcopy(pool)
    for b, g in zip(picks.tolist(), gens.tolist(), strict=True):
        one.unref(b, g)
    pool.unref_many(picks, gens)
    for name in ("refs", "gen", "in_use_mask", "published"):
        assert (getattr(pool, name) == getattr(one, name)).all(), name
    assert pool._nfree == one._nfree
    assert (pool._free[:pool._nfree] == one._free[:one._nfree]).all()  # the same order
    assert pool.by_hash == one.by_hash


def test_unref_many_frees_a_block_named_twice_once():
    pool, _ = _pool(np.random.default_rng(0), B=8)
    pool.reserve(1, np.zeros(0, np.int64))
    b = int(pool.take_many(1)[0])
    pool.ref(b)
    nfree = pool._nfree
    pool.unref_many(np.array([b, b]), pool.gen[[b, b]])
    assert pool.refs[b] == 0 and not pool.in_use_mask[b] and pool._nfree == nfree + 1
