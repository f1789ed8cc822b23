"""Host ingest throughput of RouteStore against a plain numpy copy of the same bytes.

Shapes of Qwen3-30B-A3B's router (48 MoE layers, top-8 of 128 experts: one byte per id). Two step
mixes, measured side by side in one run (interleaved repeats, median):

* decode: 256 requests, one row each (256 segments per step), with the segments as a list of
  tuples (``ingest``) and as integer arrays (``ingest_arrays``: no Python per segment); the
  requests in step with each other (a new block for all of them every 16th step), and
  staggered as in a running engine's steady state (16 of them start a new block every step,
  4 finish and are replaced);
* prefill: 4 requests, 2048-row chunks (8192 rows per step);

and ``take`` of one 32,768-token request (the whole trace, as a trainer reads it); and the time
of ``free`` of one 2048-token request (an event: absolute time, no baseline).

The baseline copies the same bytes into a preallocated buffer of the same size with one
``np.copyto``: the floor for any host path that keeps the data (for ``take``: the trace's ids).

The ratio of minima says more than the ratio of medians on a shared, loaded machine.

Run: python benchmarks/store_ingest.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from routecap.store import RouteStore

L, K, E, BLOCK = 48, 8, 128, 16


def _step(rng, n_rows):
    ids = np.empty((n_rows, L, K), np.uint8)
    for i in range(n_rows):
        ids[i] = rng.permutation(E)[:K]
    return ids


def bench_decode(rng, batch, steps):
    store = RouteStore(num_experts=E, moe_layers=range(L), top_k=K, block_size=BLOCK,
                       budget_bytes=2 << 30)
    for r in range(batch):
        store.add_request(r, prompt_len=1)
    step = _step(rng, batch)
    return _side_by_side(step, steps, lambda s: (
        store.ingest, [(r, s, r, 1) for r in range(batch)]))


def bench_decode_arrays(rng, batch, steps):
    """The same decode steps through ingest_arrays: segments as integer arrays."""
    store = RouteStore(num_experts=E, moe_layers=range(L), top_k=K, block_size=BLOCK,
                       budget_bytes=2 << 30)
    for r in range(batch):
        store.add_request(r, prompt_len=1)
    handles = np.array([store.handle(r) for r in range(batch)], np.int64)
    rows = np.arange(batch, dtype=np.int64)
    ones = np.ones(batch, np.int64)
    step = _step(rng, batch)

    def ingest(ids, valid, starts):
        store.ingest_arrays(ids, valid, handles, starts, rows, ones)

    return _side_by_side(step, steps, lambda s: (ingest, np.full(batch, s, np.int64)))


def bench_decode_staggered(rng, batch, steps, life=64):
    """ingest_arrays of decode steps in a running engine's steady state: requests at every
    position of their ``life`` tokens, so each step 1 in ``BLOCK`` of them starts a new block
    (the fresh path) and 1 in ``life`` finishes and is replaced by a new one (outside the
    timing), whose blocks come back warm from the free stack. Timed after one ``life`` of
    steps (the first touch of the pool's pages is not a steady-state cost)."""
    store = RouteStore(num_experts=E, moe_layers=range(L), top_k=K, block_size=BLOCK,
                       budget_bytes=2 << 30)
    warm = _step(rng, life)
    serial = iter(range(1 << 30))
    keys = [next(serial) for _ in range(batch)]
    pos = np.arange(batch, dtype=np.int64) % life
    for r, key in enumerate(keys):
        store.add_request(key, prompt_len=1)
        if pos[r]:
            store.write(key, 0, warm[:pos[r]])
    handles = np.array([store.handle(k) for k in keys], np.int64)
    rows = np.arange(batch, dtype=np.int64)
    ones = np.ones(batch, np.int64)
    step = _step(rng, batch)

    def ingest(ids, valid, starts):
        store.ingest_arrays(ids, valid, handles, starts, rows, ones)
        pos[:] = starts + 1

    def prepare(_):
        for r in np.flatnonzero(pos >= life).tolist():
            store.free(keys[r])
            keys[r] = next(serial)
            store.add_request(keys[r], prompt_len=1)
            handles[r] = store.handle(keys[r])
            pos[r] = 0
        return ingest, pos.copy()

    return _side_by_side(step, steps, prepare, warmup=life)


def _side_by_side(step, steps, prepare, warmup=0):
    """Per step: the store's ingest, then one np.copyto of the same bytes; times of each (not of
    the first ``warmup`` steps)."""
    dst = np.empty_like(step)
    t_store, t_copy = [], []
    for s in range(-warmup, steps):
        if s < 0:
            ingest, segments = prepare(s + warmup)
            ingest(step, None, segments)
            continue
        ingest, segments = prepare(s)
        t0 = time.perf_counter()
        ingest(step, None, segments)
        t1 = time.perf_counter()
        np.copyto(dst, step)
        t2 = time.perf_counter()
        t_store.append(t1 - t0)
        t_copy.append(t2 - t1)
    return step.nbytes, t_store, t_copy


def bench_prefill(rng, reqs, chunk, steps):
    store = RouteStore(num_experts=E, moe_layers=range(L), top_k=K, block_size=BLOCK,
                       budget_bytes=4 << 30)
    step = _step(rng, reqs * chunk)
    t_free = []

    def prepare(s):
        for r in range(reqs):
            if s:
                t0 = time.perf_counter()
                store.free((s - 1, r))
                t_free.append(time.perf_counter() - t0)
            store.add_request((s, r), prompt_len=chunk)
        return store.ingest, [((s, r), 0, r * chunk, chunk) for r in range(reqs)]

    out = _side_by_side(step, steps, prepare)
    print(f"free: 1 request of {chunk} tokens ({chunk // BLOCK} blocks): min/median "
          f"{min(t_free) * 1e6:.1f}/{statistics.median(t_free) * 1e6:.1f} us")
    return out


def bench_take(rng, tokens, repeats):
    store = RouteStore(num_experts=E, moe_layers=range(L), top_k=K, block_size=BLOCK,
                       budget_bytes=1 << 30)
    store.add_request("long", prompt_len=tokens)
    chunk = _step(rng, 2048)
    for s in range(0, tokens, 2048):
        store.write("long", s, chunk)
    src = np.concatenate([chunk] * (tokens // 2048))
    dst = np.empty_like(src)
    t_store, t_copy = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        trace = store.take("long")
        t1 = time.perf_counter()
        np.copyto(dst, src)
        t2 = time.perf_counter()
        t_store.append(t1 - t0)
        t_copy.append(t2 - t1)
    assert trace.num_tokens == tokens and trace.missing is None
    return src.nbytes, t_store, t_copy


def report(name, nbytes, t_store, t_copy):
    ms, mc = statistics.median(t_store), statistics.median(t_copy)
    print(f"{name:<34} {nbytes / 1e6:8.2f} MB      store {nbytes / ms / 1e9:7.2f} GB/s "
          f"({ms * 1e3:7.3f} ms)  numpy copy {nbytes / mc / 1e9:7.2f} GB/s ({mc * 1e3:7.3f} ms)  "
          f"store/copy time x{ms / mc:6.1f} (medians), x{min(t_store) / min(t_copy):6.1f} (minima)"
          f"  [store min/med/max ms {min(t_store) * 1e3:.3f}/{ms * 1e3:.3f}/"
          f"{max(t_store) * 1e3:.3f}]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"router shape: L={L} MoE layers, top-{K} of E={E} (uint8), block {BLOCK} tokens")
    report("decode: 256 requests x 1 row", *bench_decode(rng, 256, args.repeats * 4))
    if hasattr(RouteStore, "ingest_arrays"):  # (absent before it landed: the "before" runs)
        report("decode, ingest_arrays: 256 x 1 row",
               *bench_decode_arrays(rng, 256, args.repeats * 4))
        report("decode, staggered: 256 x 1 row", *bench_decode_staggered(rng, 256,
                                                                         args.repeats * 4))
    report("prefill: 4 requests x 2048 rows", *bench_prefill(rng, 4, 2048, args.repeats))
    report("take: 1 request x 32768 tokens", *bench_take(rng, 32768, args.repeats))


if __name__ == "__main__":
    main()
