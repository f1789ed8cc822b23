"""Decode speed of this codec against an earlier revision's, interleaved on the same bytes.

The earlier codec is loaded from a file (it was one module, ``routecap/codec.py``, before it
became a package), e.g.:

    git show 3f7f42b:src/routecap/codec.py > /tmp/codec_old.py
    python benchmarks/codec_decode_ab.py --old /tmp/codec_old.py [--repeats 9]

Both decode the same encodings (written by this version: the wire format did not change, as
tests/test_golden.py checks), one call of each in turn, so load on a shared machine hits both
alike. Routes: the captured traces of codec_formats.py (its cache), repeated to 32,768 tokens
(two blocks, decoded on two threads as in a real trace of that length). Prints MB/s of raw
uint8 equivalent, medians, and the ratio new/old.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time

import numpy as np
from codec_formats import captured_trace

from routecap import codec
from routecap.trace import RoutingTrace


def load_old(path: str):
    spec = importlib.util.spec_from_file_location("routecap._codec_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its relative imports resolve inside routecap
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=True, help="an earlier revision's routecap/codec.py")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--tokens", type=int, default=8192, help="tokens captured (then repeated)")
    args = ap.parse_args()
    old = load_old(args.old)
    for shape in ((48, 128, 8), (58, 256, 8)):
        t = captured_trace(*shape, args.tokens)
        reps = max(1, 32768 // t.num_tokens)
        t = RoutingTrace.from_ids(np.concatenate([t.expert_ids] * reps), num_experts=t.num_experts,
                                  moe_layers=t.moe_layers, request_id="ab", prompt_len=1)
        s = t.with_sorted_topk()
        blobs = {
            "order": (t, codec.encode(t, mode="order")),
            "order packed": (t, codec.encode(t, mode="order", fallback=False)),
            "set": (s, codec.encode(s, mode="set")),
            "set packed": (s, codec.encode(s, mode="set", fallback=False)),
            "ids packed": (t, codec.encode(t, mode="ids", fallback=False)),
        }
        raw = t.expert_ids.nbytes
        print(f"\n{t.num_tokens} tokens, {shape[0]} layers, top-{shape[2]} of {shape[1]}: decode "
              f"MB/s of raw uint8, median of {args.repeats}, interleaved")
        for name, (want, blob) in blobs.items():
            assert old.decode(blob).equals(want) and codec.decode(blob).equals(want)
            times: dict[str, list[float]] = {"old": [], "new": []}
            for _ in range(args.repeats):
                for key, mod in (("old", old), ("new", codec)):
                    t0 = time.perf_counter()
                    mod.decode(blob)
                    times[key].append(time.perf_counter() - t0)
            o, n = statistics.median(times["old"]), statistics.median(times["new"])
            print(f"  {name:<14} old {raw / o / 1e6:7.0f}  new {raw / n / 1e6:7.0f}  "
                  f"new/old {o / n:5.2f}")


if __name__ == "__main__":
    main()
