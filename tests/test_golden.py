"""Golden files: bytes written by this version of routecap, read back byte-exact by this one.

tests/golden/ holds one trace file (``files.save_file``, format version 1) and one wire record
of each codec mode and storage (``codec.encode``, wire version 1), all of traces computed here
from a formula (no random generator whose stream could change). A change to either format that
would stop today's files from reading the same, or make encoding write other bytes, fails here.
Readers must keep reading these files after any format change; new versions add files beside
them (tests/golden/make_golden.py writes them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from routecap import codec
from routecap.files import load_file
from routecap.trace import RoutingTrace, validate_trace

GOLDEN = Path(__file__).resolve().parent / "golden"
TRACE_FILE = "traces-v1.safetensors"
# file name -> (E, K, sorted, tokens T, encode arguments); the storage each one must have is
# checked below
RECORDS = {
    "wire-v1-order.rcap": (128, 8, False, 40, dict(mode="order", fallback=False, block_tokens=16)),
    "wire-v1-set.rcap": (128, 8, True, 40, dict(mode="set", fallback=False, block_tokens=16)),
    "wire-v1-ids.rcap": (300, 6, False, 40, dict(mode="ids", fallback=False, block_tokens=16)),
    "wire-v1-raw.rcap": (300, 6, False, 40, dict(mode="raw", block_tokens=16)),
    "wire-v1-order-fallback.rcap": (128, 8, False, 64, dict(mode="order", block_tokens=64)),
    "wire-v1-set-oneframe.rcap": (128, 8, True, 40, dict(mode="set")),
    "wire-v1-entropy.rcap": (128, 8, True, 40, dict(mode="entropy", fallback=False,
                                                    block_tokens=16)),
}
STORAGE = {  # (mode, layout, block codecs) each record must exercise
    "wire-v1-order.rcap": ("order", "token", {"zstd", "none"}),
    "wire-v1-set.rcap": ("set", "token", {"zstd", "none"}),
    "wire-v1-ids.rcap": ("ids", "token", {"zstd", "none"}),
    "wire-v1-raw.rcap": ("raw", "token", {"zstd"}),
    "wire-v1-order-fallback.rcap": ("raw", "layer", {"zstd"}),
    "wire-v1-set-oneframe.rcap": ("raw", "token", {"zstd"}),
    "wire-v1-entropy.rcap": ("entropy", "layer", {"zstd", "none"}),
}


def golden_trace(E: int, K: int, *, seed: int = 0, sort: bool = False, tokens: bool = True,
                 T: int = 40, L: int = 4) -> RoutingTrace:
    """A trace from a formula: K distinct ids per row, a layer's rows often repeating, missing
    cells, and the router's order scrambled on odd rows."""
    t, layer, k = np.meshgrid(np.arange(T), np.arange(L), np.arange(K), indexing="ij")
    base = ((t // 3) * 31 + layer * 17 + seed * 5 + (t % 7 == 0) * 11) % E
    ids = (base + k * (E // K)) % E
    odd = ((t + layer) % 2 == 1)[..., 0]
    ids[odd] = ids[odd][:, ::-1]
    missing = ((t * 3 + layer) % 11 == 0)[..., 0] & (t[..., 0] > 0)
    trace = RoutingTrace.from_ids(
        ids, num_experts=E, moe_layers=[1, 3, 5, 7][:L], request_id=f"golden-{seed}",
        prompt_len=T - 5, start=2, model="golden/model", missing=missing,
        token_ids=(np.arange(T, dtype=np.int32) * 7 + seed) if tokens else None,
        extra={"sampler": {"temperature": 0.7}, "turn": seed})
    return trace.with_sorted_topk() if sort else trace


def record_args(name: str) -> tuple[RoutingTrace, dict]:
    E, K, sort, T, kwargs = RECORDS[name]
    return golden_trace(E, K, sort=sort, T=T), kwargs


def test_the_trace_file_reads_byte_exact():
    path = GOLDEN / TRACE_FILE
    expected = [golden_trace(128, 8, seed=0), golden_trace(128, 8, seed=1, tokens=False)]
    for verify in (True, False):
        got = load_file(path, verify=verify)
        assert len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            validate_trace(g)
            assert g.equals(e), (g, e)
            assert g.metadata() == e.metadata()


@pytest.mark.parametrize("name", list(RECORDS))
def test_wire_records_decode_byte_exact_and_reencode_to_the_same_bytes(name):
    data = (GOLDEN / name).read_bytes()
    trace, kwargs = record_args(name)
    got = codec.decode(data)
    validate_trace(got)
    assert got.equals(trace)
    assert got.missing is not None and got.num_missing == trace.num_missing
    routes = codec.inspect(data)["routes"]
    mode, layout, block_codecs = STORAGE[name]
    assert (routes["mode"], routes["layout"]) == (mode, layout)
    assert {b[1] for b in routes["blocks"]} <= block_codecs
    # the same trace encoded by this version: the very same bytes (a zstandard release that
    # compresses differently would also show here; the decoded trace above would still match)
    assert codec.encode(trace, **kwargs) == data, f"{name}: encoding changed"
