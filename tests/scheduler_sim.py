"""A deterministic serving-engine simulator that knows the true route of every token.

It schedules like vLLM v1: continuous batching under a token budget per step, chunked prefill,
prefix-cache hits by block hash (an engine-side KV cache with its own LRU capacity), preemption
and recompute, speculative decoding with random acceptance, aborts, and several data-parallel
ranks with uneven load stepping in lockstep. Like vLLM, the engine marks a block cached as soon
as it is *scheduled*, and admits waiting requests one at a time after planning each: so groups of
``n`` samples of one prompt (GRPO-style parallel sampling) arriving together hit, in the same
step, blocks whose rows arrive only in that step's ingest (the store's same-step prefix hits).
The store's :meth:`~routecap.store.RouteStore.check_invariants` runs after every step. Every row the "model" computes comes from a
pseudo-router: a hash of the whole input prefix up to that position, so a row computed from a
rejected draft token, or put under the wrong request or position, is a wrong route.

The routes reach the store either directly (``RouteStore.ingest``) or through the device step
buffer: every DP rank's rows are concatenated as the naive all-gather dispatch does, and each
rank's :class:`StepCapturer` picks its rows with the gathered layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from routecap.store import EVICTED, PENDING, PRESENT, RouteStore

MASK = (1 << 61) - 1


def mix(h: int, token: int, pos: int) -> int:
    return ((h * 1_000_003) ^ (token * 0x9E3779B97F4A7C15) ^ (pos * 0xC2B2AE3D27D4EB4F)) & MASK


def route(h: int, L: int, K: int, E: int) -> np.ndarray:
    """[L, K] distinct expert ids from a prefix hash (E a power of two, odd stride)."""
    out = np.empty((L, K), np.int64)
    for layer in range(L):
        x = (h ^ (layer * 0x94D049BB133111EB)) & MASK
        start, stride = x % E, 2 * ((x >> 20) % (E // 2)) + 1
        out[layer] = (start + stride * np.arange(K)) % E
    return out


@dataclass
class SimRequest:
    rid: str
    prompt: list[int]
    max_new: int
    tokens: list[int]
    hashes: list[int] = field(default_factory=list)  # prefix hash of each true position
    computed: int = 0
    running: bool = False
    done: bool = False

    def hash_at(self, p: int) -> int:
        while len(self.hashes) <= p:
            q = len(self.hashes)
            prev = self.hashes[-1] if self.hashes else 0
            self.hashes.append(mix(prev, self.tokens[q], q))
        return self.hashes[p]


@dataclass
class Stats:
    steps: int = 0
    finished: int = 0
    checked_cells: int = 0
    missing_cells: int = 0
    wrong_cells: int = 0
    prefix_hits: int = 0
    preemptions: int = 0
    rejected_rows: int = 0
    chunks: int = 0
    aborts: int = 0
    group_hits: int = 0  # prefix hits on blocks scheduled, not yet published, in the same step
    evictions: int = 0
    max_store_bytes: int = 0


class Engine:
    """One data-parallel rank: scheduler, engine-side prefix cache, and its RouteStore."""

    def __init__(self, rank: int, rng: np.random.Generator, store: RouteStore, *, E: int,
                 vocab: int, token_budget: int, kv_blocks: int, max_running: int,
                 p_spec: float, p_preempt: float, p_abort: float, arrival: float,
                 prefixes: list[list[int]], p_group: float = 0.0):
        self.rank, self.rng, self.store = rank, rng, store
        self.E, self.vocab, self.P = E, vocab, store.block_size
        self.L, self.K = store.num_layers, store.top_k
        self.token_budget, self.kv_blocks, self.max_running = token_budget, kv_blocks, max_running
        self.p_spec, self.p_preempt, self.p_abort, self.arrival = p_spec, p_preempt, p_abort, arrival
        self.prefixes = prefixes
        self.p_group = p_group
        self.scheduled: set[int] = set()  # hashes cached this step, not published yet
        self.cache: dict[int, None] = {}  # engine prefix cache: block hash -> None, LRU order
        self.waiting: list[SimRequest] = []
        self.running: list[SimRequest] = []
        self.n = 0

    # ---- the true model -----------------------------------------------------------------------
    def next_token(self, h: int) -> int:
        return 3 + (h >> 7) % (self.vocab - 3)

    def block_hash(self, req: SimRequest, j: int) -> int:
        # the engine's content hash of block j: the prefix hash at its last position
        return req.hash_at((j + 1) * self.P - 1) ^ 0x5555

    def block_hashes(self, req: SimRequest, upto: int) -> list[int]:
        return [self.block_hash(req, j) for j in range(upto // self.P)]

    # ---- scheduling ---------------------------------------------------------------------------
    def arrive(self) -> None:
        if self.rng.random() < self.arrival:
            g = self.rng
            prompt = list(self.prefixes[g.integers(len(self.prefixes))]) if g.random() < 0.6 else []
            prompt += [int(t) for t in g.integers(3, self.vocab, int(g.integers(1, 14)))]
            # parallel sampling: n samples of one prompt arrive together (a GRPO group)
            n = int(g.integers(2, 5)) if g.random() < self.p_group else 1
            for _ in range(n):
                self.waiting.append(SimRequest(rid=f"r{self.rank}.{self.n}", prompt=prompt,
                                               max_new=int(g.integers(1, 12)),
                                               tokens=list(prompt)))
                self.n += 1

    def admit(self, req: SimRequest, stats: Stats) -> None:
        # longest cached prefix of full blocks; at least one token must still run
        limit = (len(req.tokens) - 1) // self.P
        j = 0
        while j < limit and self.block_hash(req, j) in self.cache:
            self.cache[self.block_hash(req, j)] = self.cache.pop(self.block_hash(req, j))
            stats.group_hits += self.block_hash(req, j) in self.scheduled
            j += 1
        cached = j * self.P
        hashes = self.block_hashes(req, cached)
        if req.rid in self.store:
            self.store.restart(req.rid, num_cached_tokens=cached, block_hashes=hashes)
        else:
            self.store.add_request(req.rid, prompt_len=len(req.prompt), num_cached_tokens=cached,
                                   block_hashes=hashes)
        stats.prefix_hits += cached > 0
        req.computed = cached
        req.running = True
        self.running.append(req)

    def plan_step(self, stats: Stats) -> list[tuple[SimRequest, int, list[int], int]]:
        """[(request, start, input tokens, drafts)] for this step.

        Running requests first, then waiting ones admitted one at a time (vLLM v1's order); the
        full blocks each plan computes are marked cached in the engine as it is planned.
        """
        g = self.rng
        self.scheduled.clear()
        if self.running and g.random() < self.p_preempt:
            victim = self.running.pop(int(g.integers(len(self.running))))
            victim.running = False
            self.waiting.insert(0, victim)
            stats.preemptions += 1
        if self.running and g.random() < self.p_abort:
            victim = self.running.pop(int(g.integers(len(self.running))))
            self.store.free(victim.rid)
            victim.done = True
            stats.aborts += 1
        self.budget = self.token_budget
        plan: list[tuple[SimRequest, int, list[int], int]] = []
        for req in self.running:
            if self.budget <= 0:
                break
            self.plan_one(req, plan, stats)
        while self.waiting and len(self.running) < self.max_running and self.budget > 0:
            req = self.waiting.pop(0)
            self.admit(req, stats)
            self.plan_one(req, plan, stats)
        return plan

    def plan_one(self, req: SimRequest, plan: list, stats: Stats) -> None:
        g = self.rng
        budget = self.budget
        pending = len(req.tokens) - req.computed
        s = req.computed
        if pending == 1 and g.random() < self.p_spec and budget > 1:
            d = int(g.integers(1, min(4, budget)))
            drafts = []
            h = req.hash_at(s)
            for _ in range(d):  # a draft model that is right most of the time
                t = self.next_token(h) if g.random() < 0.7 else int(g.integers(3, self.vocab))
                drafts.append(t)
                h = mix(h, t, s + 1 + len(drafts) - 1)
            plan.append((req, s, [req.tokens[s]] + drafts, d))
            self.budget -= 1 + d
            true_end = s + 1
        else:
            n = min(pending, budget)
            stats.chunks += n < pending
            plan.append((req, s, req.tokens[s:s + n], 0))
            self.budget -= n
            true_end = s + n
        # the engine caches the full blocks of scheduled (true) tokens now, before the forward
        for h in self.block_hashes(req, true_end):
            if h not in self.cache:
                self.scheduled.add(h)
            self.cache.pop(h, None)
            self.cache[h] = None
        while len(self.cache) > self.kv_blocks:
            self.cache.pop(next(iter(self.cache)))

    def rows(self, plan) -> np.ndarray:
        """The routes the model computes for a plan: [N, L, K]."""
        out = []
        for req, s, inputs, _ in plan:
            h = req.hash_at(s - 1) if s > 0 else 0
            for i, t in enumerate(inputs):
                h = mix(h, t, s + i)
                out.append(route(h, self.L, self.K, self.E))
        if not out:
            return np.zeros((0, self.L, self.K), np.int64)
        return np.stack(out)

    def finish_step(self, plan, stats: Stats) -> None:
        g = self.rng
        for req, s, inputs, d in plan:
            n = len(inputs)
            if s + n < len(req.tokens):  # a prefill chunk that does not reach the end
                req.computed = s + n
                continue
            if d:
                drafts = inputs[1:]
                a = 0
                for i, t in enumerate(drafts):
                    if t != self.next_token(req.hash_at(s + i)):
                        break
                    req.tokens.append(t)
                    a += 1
                bonus = self.next_token(req.hash_at(s + a))
                req.tokens.append(bonus)
                if a < d:
                    self.store.truncate(req.rid, s + a + 1)  # rows of rejected drafts
                    stats.rejected_rows += d - a
                req.computed = s + a + 1
            else:
                req.tokens.append(self.next_token(req.hash_at(s + n - 1)))
                req.computed = s + n
            generated = len(req.tokens) - len(req.prompt)
            if generated >= req.max_new:
                del req.tokens[len(req.prompt) + req.max_new:]
                T = len(req.tokens) - 1
                if self.store.length(req.rid) > T:
                    self.store.truncate(req.rid, T)
                req.computed = T
                req.done = True
        for req, _, _, _ in plan:
            full = req.computed // self.P
            hashes = self.block_hashes(req, full * self.P)
            self.store.publish(req.rid, hashes)
            for h in hashes:
                self.cache.pop(h, None)
                self.cache[h] = None
            while len(self.cache) > self.kv_blocks:
                self.cache.pop(next(iter(self.cache)))
        self.store.check_invariants()
        for req in [r for r, *_ in plan if r.done]:
            self.check(req, stats, start=0)
            self.store.free(req.rid)
            self.running.remove(req)
            stats.finished += 1
        if self.running and g.random() < 0.05:  # a partial take with an offset, mid-request
            req = self.running[int(g.integers(len(self.running)))]
            if req.computed:
                self.check(req, stats, start=int(g.integers(req.computed)), end=req.computed)

    def check(self, req: SimRequest, stats: Stats, *, start: int, end: int | None = None) -> None:
        T = len(req.tokens) - 1 if end is None else end
        assert self.store.length(req.rid) == T, (req.rid, self.store.length(req.rid), T)
        tr = self.store.take(req.rid, start, T)
        assert tr.start == start and tr.num_tokens == T - start and tr.prompt_len == len(req.prompt)
        truth = np.stack([route(req.hash_at(p), self.L, self.K, self.E)
                          for p in range(start, T)]) if T > start else np.zeros((0, self.L, self.K))
        got = tr.expert_ids.astype(np.int64)
        miss = tr.missing if tr.missing is not None else np.zeros((T - start, self.L), bool)
        wrong = ((got != truth).any(-1)) & ~miss
        stats.wrong_cells += int(wrong.sum())
        stats.checked_cells += miss.size
        stats.missing_cells += int(miss.sum())
        if miss.any():
            cov = self.store.coverage(req.rid, start, T)
            rows = miss.any(axis=1)
            # missing only where the budget forced an eviction: the block was evicted, or the
            # prefix hit waits on a hash whose block was evicted before it was published
            assert np.isin(cov[rows], (EVICTED, PENDING)).all(), (req.rid, cov[rows])
        assert (self.store.coverage(req.rid, start, T)[~miss.any(axis=1)] == PRESENT).all()


#: requests whose block tables the simulator's budgets leave room for (running, preempted)
TABLE_ROOM_REQUESTS = 24


def budget_bytes(blocks: int, *, L: int, K: int, block_size: int) -> int:
    """A budget of ``blocks`` blocks plus the block tables of the simulator's requests."""
    from routecap.store import _ENTRY_BYTES, _REQUEST_BYTES

    block = block_size * L * K + block_size * L + block_size + 128
    tables = TABLE_ROOM_REQUESTS * (_REQUEST_BYTES + 16 * _ENTRY_BYTES)
    return (blocks + -(-tables // block)) * block


def simulate(seed: int, steps: int, *, ranks: int = 2, L: int = 2, K: int = 2, E: int = 16,
             block_size: int = 4, budget_blocks: int | None = None, via_capturer: bool = False,
             p_group: float = 0.15) -> Stats:
    """Run ``steps`` lockstep steps of ``ranks`` engines; returns what happened."""
    rng = np.random.default_rng(seed)
    prefixes = [[int(t) for t in rng.integers(3, 40, int(rng.integers(3, 12)))] for _ in range(4)]
    stats = Stats()
    budget = budget_bytes(budget_blocks or 10_000, L=L, K=K, block_size=block_size)
    engines = []
    for r in range(ranks):
        store = RouteStore(num_experts=E, moe_layers=list(range(L)), top_k=K,
                           block_size=block_size, budget_bytes=budget)
        engines.append(Engine(
            r, np.random.default_rng([seed, r]), store, E=E, vocab=40,
            token_budget=int(rng.integers(6, 24)), kv_blocks=int(rng.integers(4, 40)),
            max_running=int(rng.integers(1, 6)), p_spec=float(rng.random() * 0.5),
            p_preempt=float(rng.random() * 0.05), p_abort=0.005,
            arrival=float(rng.random()) * (r + 1) / ranks, prefixes=prefixes, p_group=p_group))
    capturers = None
    if via_capturer:
        capturers = _capturers(engines, L, K, E)
    for _ in range(steps):
        plans = []
        for eng in engines:
            eng.arrive()
            plans.append(eng.plan_step(stats))
        rows = [eng.rows(plan) for eng, plan in zip(engines, plans)]
        for r, (eng, plan) in enumerate(zip(engines, plans)):
            segments, row = [], 0
            for req, s, inputs, _ in plan:
                segments.append((req.rid, s, row, len(inputs)))
                row += len(inputs)
            if capturers is None and r % 2:  # odd ranks: the array form of the same step
                st = eng.store
                arr = np.array([(st.handle(rid), s, row, n) for rid, s, row, n in segments],
                               np.int64).reshape(-1, 4)
                st.ingest_arrays(rows[r].astype(st.dtype), None, *arr.T.copy())
            elif capturers is None:
                eng.store.ingest(rows[r].astype(eng.store.dtype), None, segments)
            else:
                capturers[r].run(rows, r, segments)
            eng.finish_step(plan, stats)
            stats.max_store_bytes = max(stats.max_store_bytes, eng.store.nbytes)
            assert eng.store.nbytes <= eng.store.budget_bytes
        stats.steps += 1
    stats.evictions = sum(e.store.evictions for e in engines)
    return stats


class _CapturePath:
    """Rows reach the store through a StepCapturer with the gathered layout, as a DP rank would."""

    def __init__(self, store: RouteStore, rank: int, ranks: int, L: int, K: int, E: int):
        import torch

        from routecap.capturer import CaptureSpec, StepCapturer

        self.torch = torch
        self.store, self.rank, self.ranks, self.L = store, rank, ranks, L
        self.segments: list = []
        self.cap = StepCapturer(CaptureSpec(num_layers=L, top_k=K, num_experts=E, max_tokens=64),
                                device="cpu", sink=self._sink)

    def _sink(self, snap) -> None:
        self.store.ingest(snap.expert_ids_NLK, snap.valid_NL, self.segments)

    def run(self, rows_by_rank: list[np.ndarray], rank: int, segments: list) -> None:
        from routecap.layout import RankView

        torch = self.torch
        counts = [r.shape[0] for r in rows_by_rank]
        gathered = torch.from_numpy(np.concatenate(rows_by_rank, axis=0))  # [sum n, L, K]
        self.segments = segments
        self.cap.begin_step(counts[rank], view=RankView(tokens_per_dp=counts, dp_rank=rank),
                            layout="gathered")
        for layer in range(self.L):
            self.cap.capture(layer, gathered[:, layer])
        self.cap.end_step()
        self.cap.drain()


def _capturers(engines, L, K, E):
    return [_CapturePath(e.store, e.rank, len(engines), L, K, E) for e in engines]
