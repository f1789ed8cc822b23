"""The store's compiled step with new blocks (store_step: fresh_step, step_fast): against its plain twin on a
simulated engine's steps, against the general path, and what a refusal leaves (nothing)."""

from __future__ import annotations

import numpy as np
import pytest
from scheduler_sim import simulate

import routecap.store_ingest as store_ingest
import routecap.store_step as store_step
from routecap.store import RouteStore, StoreError
from routecap.store_tables import TableSlab
from routecap.store_step import (
    FRESH_FULL,
    FRESH_GROW,
    STEP_EVENTS,
    STEP_FRESH,
    STEP_STORED,
    fresh_step_py,
)


def _state(s):
    """Everything a step may change, as plain data (but the LRU clock, which every step ticks)."""
    t, pool = s.t, s.pool
    tables = {k: (r.blocks[:r.nblocks].tolist(), r.gens[:r.nblocks].tolist(), r.capacity)
              for k, r in t.reqs.items()}
    return (t.slot_state.tolist(), tables, t.table_bytes, pool.limit, pool.in_use,
            pool.refs.tolist(), pool.in_use_mask.tolist(), pool.lost.tolist(),
            pool.gen_use.tolist(), pool.valid.tolist(), s.nbytes)


def _twin(compiled, plain, seen, **plain_globals):
    """``compiled``, and ``plain`` on copies of the arguments (its module's globals patched as
    given, for that call only): the same answer and every array the same after."""

    def both(*args):
        copies = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
        got = compiled(*args)
        saved = {k: getattr(store_step, k) for k in plain_globals}
        try:
            for k, v in plain_globals.items():
                setattr(store_step, k, v)
            want = plain(*copies)
        finally:
            for k, v in saved.items():
                setattr(store_step, k, v)
        assert got == want
        for x, c in zip(args, copies, strict=True):
            if isinstance(x, np.ndarray):
                assert (x == c).all()
        seen.append(want if np.ndim(want) == 0 else want[0])
        return got

    return both


@pytest.mark.parametrize("shape", [(8, 128), (8, 256), (2, 16), (3, 300)])
def test_the_step_kernels_match_their_plain_twins(monkeypatch, shape):
    # every step_fast call of a simulated engine (chunked prefill, decode at block boundaries,
    # speculative decoding, evictions), and every fresh_step call of the store's event path, is
    # also run by the plain Python function (step_fast's with the plain fresh_step in it) on
    # copies of its arguments: the same answer and the same state after
    K, E = shape
    steps, fresh = [], []
    monkeypatch.setattr(store_ingest, "step_fast", _twin(
        store_step.step_fast, store_step.step_fast_py, steps, fresh_step=fresh_step_py))
    monkeypatch.setattr(store_ingest, "fresh_step", _twin(
        store_step.fresh_step, fresh_step_py, fresh))
    for seed, slab in [(0, 1024), (1, 1024), (2, 1024), (0, 8), (1, 8)]:  # (8: packed often)
        monkeypatch.setattr(TableSlab, "MIN_SIZE", slab)
        st = simulate(seed, 80, ranks=1, L=2, K=K, E=E, budget_blocks=30 if seed else None)
        assert st.wrong_cells == 0 and st.checked_cells > 0
    # (every outcome: stored in tail blocks, stored with new blocks, events; grown tables)
    assert {STEP_STORED, STEP_FRESH, STEP_EVENTS} <= set(steps), set(steps)
    assert FRESH_GROW in fresh and -1 in fresh, set(fresh)


def _fresh_codes(monkeypatch):
    """The codes of fresh_step's calls from Python (the store's event path), as they come."""
    codes = []
    compiled = store_ingest.fresh_step

    def spy(*args):
        got = compiled(*args)
        codes.append(got[0])
        return got

    monkeypatch.setattr(store_ingest, "fresh_step", spy)
    return codes


def _random_steps(rng, n_steps, L, K, E, P):
    """(request, start, rows) steps of a staggered engine: new requests with prompt chunks,
    decode rows, requests finishing; a few steps hold one bad row."""
    live, steps, serial = {}, [], 0
    for _ in range(n_steps):
        segs = []
        for rid in list(live):
            if rng.random() < 0.1:
                del live[rid]
                segs.append(("free", rid))
        for _ in range(int(rng.integers(0, 3))):
            live[serial] = 0
            segs.append(("add", serial))
            serial += 1
        step = []
        for rid, pos in live.items():
            n = int(rng.integers(1, 3 * P + 2)) if pos == 0 or rng.random() < 0.2 else 1
            step.append((rid, pos, n))
            live[rid] = pos + n
        ids = np.stack([[rng.permutation(E)[:K] for _ in range(L)]
                        for _ in range(sum(n for _, _, n in step))]).astype(
            np.uint8 if E <= 256 else np.uint16) if step else np.zeros((0, L, K), np.uint8)
        bad = bool(step) and rng.random() < 0.15
        if bad:  # a repeated id, or one out of range
            row, layer = int(rng.integers(ids.shape[0])), int(rng.integers(L))
            ids[row, layer, K - 1] = ids[row, layer, 0] if rng.random() < 0.5 else E
        steps.append((segs, step, ids))
        if bad:  # the engine sees the refusal: the rows of that step are not kept
            for rid, pos, _ in step:
                live[rid] = pos
    return steps


def _run(steps, L, K, E, P, budget, fresh):
    s = RouteStore(num_experts=E, moe_layers=range(L), top_k=K, block_size=P,
                   budget_bytes=budget)
    if not fresh:  # every step through the general path
        s.steps._store_fresh = lambda *a: False
    refused = []
    for segs, step, ids in steps:
        for what, rid in segs:
            if what == "add":
                s.add_request(rid, prompt_len=4)
            else:
                s.free(rid)
        row, seg = 0, []
        for rid, pos, n in step:
            seg.append((rid, pos, row, n))
            row += n
        try:
            s.ingest(ids, None, seg)
            refused.append(False)
        except StoreError:
            refused.append(True)
        s.check_invariants()
    out = {rid: s.take(rid).to_numpy().tolist() for rid in list(s.t.reqs)}
    return refused, out, s.blocks_in_use, s.nbytes


@pytest.mark.parametrize("shape", [(8, 128), (2, 16)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_fresh_path_stores_what_the_general_path_stores(shape, seed):
    # a staggered engine's steps through the fresh path and through the general path alone:
    # the same steps refused, the same rows stored, the same blocks and bytes
    K, E = shape
    L, P = 3, 4
    steps = _random_steps(np.random.default_rng(seed), 60, L, K, E, P)
    fast = _run(steps, L, K, E, P, 1 << 26, fresh=True)
    assert fast == _run(steps, L, K, E, P, 1 << 26, fresh=False)
    assert any(fast[0]) and not all(fast[0])


@pytest.mark.parametrize("shape", [(8, 128), (2, 16)])
def test_under_a_tight_budget_both_paths_keep_only_true_rows(shape):
    # with evictions, the LRU order of blocks taken in one step may differ between the paths
    # (which rows go missing, never which are wrong): every row either path still has is true
    K, E = shape
    L, P = 3, 4
    steps = _random_steps(np.random.default_rng(1), 60, L, K, E, P)
    refused, truth, _, nbytes = _run(steps, L, K, E, P, 1 << 26, fresh=True)
    missing = 0
    for fresh in (True, False):
        got = _run(steps, L, K, E, P, int(nbytes * 0.7), fresh=fresh)
        assert got[0] == refused and got[1].keys() == truth.keys()
        for rid, rows in got[1].items():
            have = np.array(rows).reshape(-1, L, K)
            want = np.array(truth[rid]).reshape(-1, L, K)
            kept = have[:, :, 0] >= 0
            assert (have[kept] == want[kept]).all()
            missing += int((~kept).sum())
    assert missing > 0  # (the tight budget did evict)


@pytest.mark.parametrize("slab", [1024, 8])  # (8: full after "a" and "b")
def test_a_refused_step_that_grew_a_table_gives_everything_back(monkeypatch, slab):
    # a prefill chunk past its table's capacity, refused for a bad row: every byte, block and
    # entry as before. The table grows inside the compiled step (a roomy slab), or on the event
    # path once its bytes are counted (a full slab: the codes of fresh_step's calls from Python)
    monkeypatch.setattr(TableSlab, "MIN_SIZE", slab)
    L, K, E, P = 2, 8, 128, 4
    s = RouteStore(num_experts=E, moe_layers=range(L), top_k=K, block_size=P,
                   budget_bytes=1 << 16)
    rng = np.random.default_rng(0)
    good = np.stack([[rng.permutation(E)[:K] for _ in range(L)] for _ in range(40)]).astype(
        np.uint8)
    s.add_request("a", prompt_len=40)
    s.add_request("b", prompt_len=1)
    s.ingest(good[:5], None, [("a", 0, 0, 4), ("b", 0, 4, 1)])  # a: one full block
    codes = _fresh_codes(monkeypatch)
    before = _state(s)
    for bad_row in (1, 2, 36):  # in b's tail block, a's first new block, a's last (partial) one
        bad = good.copy()
        bad[bad_row, 1, 3] = bad[bad_row, 1, 5]
        with pytest.raises(StoreError, match=f"distinct expert ids in each row, got .* at step "
                                             f"row {bad_row}"):
            s.ingest(bad[:37], None, [("b", 1, 0, 1), ("a", 4, 1, 36)])  # a: 9 blocks, cap 4
        assert codes[-2:] == ([FRESH_GROW, bad_row * L + 1] if slab < 1024 else [])
        assert _state(s) == before
    s.ingest(good[:37], None, [("b", 1, 0, 1), ("a", 4, 1, 36)])
    assert codes[-2:] == ([FRESH_GROW, -1] if slab < 1024 else [])
    s.check_invariants()
    assert s.t.reqs["a"].capacity == 16
    assert (s.take("a").expert_ids == np.concatenate([good[:4], good[1:37]])).all()
    assert (s.take("b").expert_ids == good[[4, 0]]).all()


def test_blocks_that_need_an_eviction_go_the_general_way(monkeypatch):
    # the pool is full of a finished request's published blocks: the fresh path says FULL and
    # the general path evicts them (least recently used first)
    L, K, E, P = 1, 2, 16, 4
    probe = RouteStore(num_experts=E, moe_layers=range(L), top_k=K, block_size=P)
    probe.add_request("x", prompt_len=16)
    bb = probe.block_bytes
    tables = -(-probe.t.table_bytes // bb)  # the blocks one request's table takes
    s = RouteStore(num_experts=E, moe_layers=range(L), top_k=K, block_size=P,
                   budget_bytes=(6 + tables) * bb)  # room for 6 blocks next to one table
    rows = np.array([[[i % E, (i + 1) % E]] for i in range(64)], np.uint8)
    codes = _fresh_codes(monkeypatch)
    s.add_request("old", prompt_len=16)
    s.write("old", 0, rows[:16])
    s.publish("old", [f"h{j}" for j in range(4)])
    s.free("old")
    assert s.blocks_in_use == 4
    s.add_request("new", prompt_len=16)
    s.write("new", 0, rows[20:36])  # 4 blocks: 2 of the cached ones must go
    assert FRESH_FULL in codes
    assert (s.take("new").expert_ids == rows[20:36]).all() and s.pool.evictions == 2
    s.check_invariants()
