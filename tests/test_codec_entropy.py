"""The codec's ``entropy`` mode (codec/entropy.py and codec/entropy_kernels.py): round trips, size
against set mode and the per-layer bound, numba against the reference, hostile payloads."""

from __future__ import annotations

import json
import re
import struct
import zlib

import numpy as np
import pytest
import zstandard

from fuzzing import fuzz_rng, report_failure
from test_codec import _header_and_rest, _with_header
from routecap import codec
from routecap.codec import CodecError, decode, encode, entropy, entropy_kernels, inspect
from routecap.codec import kernels as codec_kernels
from routecap.codec.kernels import KernelContractError
from routecap.trace import RoutingTrace, validate_trace

needs_numba = pytest.mark.skipif(not codec_kernels.HAVE_NUMBA, reason="numba is not installed")


def skewed(T, L, K, E, *, seed=0, zipf=1.0, missing=0.0, tokens=True):
    """Sorted rows drawn with each layer's own Zipf popularity over a random order of experts
    (K experts without replacement: Gumbel top-K of the log-probabilities)."""
    rng = np.random.default_rng(seed)
    ids = np.empty((T, L, K), np.int64)
    for layer in range(L):
        logp = -zipf * np.log(np.arange(1, E + 1))[rng.permutation(E)]
        score = logp + rng.gumbel(size=(T, E))
        ids[:, layer] = np.argpartition(-score, K - 1, axis=1)[:, :K]
    miss = rng.random((T, L)) < missing if missing else None
    return RoutingTrace.from_ids(
        ids, num_experts=E, moe_layers=list(range(2, L + 2)), request_id=f"s{seed}",
        prompt_len=T, start=1, model="m", missing=miss,
        token_ids=np.arange(T, dtype=np.int32) if tokens else None).with_sorted_topk()


SHAPES = [  # (T, L, K, E): u8 and u16 orders, K = 1, K = E (one gap value), the 1024-value edge
    (40, 3, 4, 16), (60, 4, 8, 128), (30, 2, 8, 256), (20, 2, 6, 300), (9, 2, 1, 2),
    (5, 1, 8, 8), (0, 3, 4, 16), (12, 2, 3, 1026), (3, 1, 1, 1),
]


@pytest.mark.parametrize("T,L,K,E", SHAPES)
def test_roundtrip(kernels, T, L, K, E):
    t = skewed(T, L, K, E, missing=0.2, seed=T + K)
    for block in (7, codec.BLOCK_TOKENS):
        blob = encode(t, mode="entropy", fallback=False, block_tokens=block)
        routes = inspect(blob)["routes"]
        assert (routes["mode"], routes["layout"]) == ("entropy", "layer")
        back = decode(blob)
        validate_trace(back)
        assert back.equals(t), (T, L, K, E, block)


def test_a_layer_missing_in_a_whole_block_has_empty_tables(kernels):
    t = skewed(20, 3, 4, 16, seed=2)
    miss = np.zeros((20, 3), bool)
    miss[:10, 1] = True  # layer 1 has no row in the first block of 10 tokens
    miss[:, 2] = True  # layer 2 has none at all
    t = RoutingTrace.from_ids(t.expert_ids, num_experts=16, moe_layers=t.moe_layers,
                              request_id="m", prompt_len=20, missing=miss).with_sorted_topk()
    blob = encode(t, mode="entropy", fallback=False, block_tokens=10)
    assert inspect(blob)["routes"]["mode"] == "entropy"
    assert decode(blob).equals(t)


@needs_numba
def test_numba_and_the_reference_write_the_same_bytes(monkeypatch):
    for T, L, K, E in SHAPES:
        t = skewed(T, L, K, E, missing=0.1, seed=1)
        got = []
        for use in (True, False):
            monkeypatch.setattr(codec_kernels, "USE_NUMBA", use)
            got.append(encode(t, mode="entropy", fallback=False, block_tokens=8))
        assert got[0] == got[1], (T, L, K, E)


@pytest.mark.parametrize("E,K,zipf", [(128, 8, 1.0), (256, 8, 0.8)])
def test_smaller_than_set_mode_on_skewed_routes_and_within_one_percent_of_its_model(E, K, zipf):
    t = skewed(4000, 6, K, E, zipf=zipf, tokens=False)
    T, L = t.num_tokens, t.num_layers
    bits = {m: 8 * len(encode(t, mode=m, fallback=False)) / (T * L) for m in ("set", "entropy")}
    assert bits["entropy"] < bits["set"], bits
    # the stream against the empirical entropy of the gaps it codes: each layer's experts ranked
    # busiest first, each row's ranks ascending, gap i counted per (layer, i)
    ideal = 0.0
    for layer in range(L):
        x = t.expert_ids[:, layer].astype(np.int64)
        order = np.argsort(-np.bincount(x.ravel(), minlength=E), kind="stable")
        rank = np.argsort(order)
        r = np.sort(rank[x], axis=1)
        gaps = np.diff(r, axis=1, prepend=-1) - 1
        for i in range(K):
            p = np.bincount(gaps[:, i]) / T
            p = p[p > 0]
            ideal -= T * (p * np.log2(p)).sum()
    payload = entropy_kernels.encode_block(t.expert_ids, None, E)
    _, _, pos = entropy.parse_tables_py(payload, L, K, E)
    stream_bits = 8 * (len(payload) - pos)
    assert ideal <= stream_bits <= 1.01 * ideal + 64, (stream_bits, ideal)


def test_uniform_routes_fall_back_to_the_smallest_storage():
    rng = np.random.default_rng(3)
    ids = np.array([rng.permutation(64)[:4] for _ in range(30 * 2)]).reshape(30, 2, 4)
    t = RoutingTrace.from_ids(ids, num_experts=64, moe_layers=[0, 1], request_id="u",
                              prompt_len=30).with_sorted_topk()
    baseline = len(zstandard.ZstdCompressor(level=3).compress(t.expert_ids.tobytes()))
    h = inspect(encode(t, mode="entropy"))
    routes = next(s for s in h["sections"] if s["name"] == "routes")
    assert routes["bytes"] <= baseline


def test_entropy_mode_is_set_only():
    t = skewed(5, 1, 3, 16)
    unsorted = RoutingTrace.from_ids(t.expert_ids[:, :, ::-1].copy(), num_experts=16,
                                     moe_layers=[2], request_id="x", prompt_len=5)
    with pytest.raises(ValueError, match="mode='entropy' drops the order"):
        encode(unsorted, mode="entropy")


def test_too_many_experts_for_the_tables_stores_set_mode():
    t = skewed(6, 2, 2, 2000)  # E - K + 1 = 1999 gap values > 1024: ranks instead
    assert not entropy.fits(2000, 2)
    blob = encode(t, mode="entropy", fallback=False)
    assert inspect(blob)["routes"]["mode"] == "set"
    assert decode(blob).equals(t)


def test_a_block_the_tables_cannot_code_stores_set_mode(monkeypatch):
    t = skewed(20, 2, 4, 16)
    monkeypatch.setattr(entropy, "quantise", lambda counts: None)
    blob = encode(t, mode="entropy", fallback=False)
    assert inspect(blob)["routes"]["mode"] == "set"
    assert decode(blob).equals(t)


def test_quantise_keeps_every_seen_value_and_the_sum():
    counts = np.array([[1000, 1, 0, 1, 7], [0, 0, 0, 0, 0], [3, 3, 3, 3, 3]])
    f = entropy.quantise(counts)
    assert (f.sum(axis=1) == [entropy.PROB_SCALE, 0, entropy.PROB_SCALE]).all()
    assert ((f > 0) == (counts > 0)).all()
    # more values than slots: cannot be coded (the encoder then stores set mode)
    assert entropy.quantise(np.ones((1, entropy.PROB_SCALE + 1), np.int64)) is None


# ---- hostile payloads -----------------------------------------------------------------------------
def _plain(t, **kw):
    """An entropy encoding whose blocks are stored uncompressed (with a CRC-32), so that a test
    can edit the payload and fix the checksum."""
    blob = encode(t, mode="entropy", fallback=False, level=1, **kw)
    h, rest = _header_and_rest(blob)
    pos, parts = 0, []
    for b in h["routes"]["blocks"]:
        raw = rest[pos:pos + b[0]]
        pos += b[0]
        if b[1] == "zstd":
            raw = zstandard.ZstdDecompressor().decompress(raw)
        parts.append(raw)
    return h, parts, rest[pos:]


def _rebuild(h, parts, tail):
    h = json.loads(json.dumps(h))
    h["routes"]["blocks"] = [[len(p), "none", zlib.crc32(p)] for p in parts]
    h["routes"]["payload_bytes"] = [len(p) for p in parts]
    h["sections"][0]["bytes"] = sum(len(p) for p in parts)
    return _with_header(h, b"".join(parts) + tail)


def test_an_edited_payload_decodes_after_the_rebuild():
    t = skewed(30, 2, 4, 16, seed=4)
    assert decode(_rebuild(*_plain(t))).equals(t)


@pytest.mark.parametrize("edit,text", [
    (lambda p: b"\x00" + p[1:], "popularity orders or frequency tables are not valid"),
    (lambda p: p[:2 * 16 + 1], "popularity orders or frequency tables are not valid"),
    (lambda p: p[:-2], "rANS stream does not decode to exactly its rows"),
    (lambda p: p + b"\x00\x00", "rANS stream does not decode to exactly its rows"),
    (lambda p: p[:-1], "rANS stream does not decode to exactly its rows"),
])
def test_corrupt_payloads_name_the_part(kernels, edit, text):
    h, parts, tail = _plain(skewed(30, 2, 4, 16, seed=5))
    parts[0] = edit(parts[0])
    with pytest.raises(CodecError, match=text):
        decode(_rebuild(h, parts, tail))


def test_lying_entropy_headers():
    t = skewed(30, 2, 4, 16, seed=6, tokens=False)
    blob = encode(t, mode="entropy", fallback=False, block_tokens=10)
    h, rest = _header_and_rest(blob)
    top = entropy.max_payload(10, 2, 4, 16)
    for change, text in [
        (lambda h: h["routes"].pop("payload_bytes"), "need 'payload_bytes' for 3 blocks"),
        (lambda h: h["routes"]["payload_bytes"].pop(), "need 'payload_bytes' for 3 blocks"),
        (lambda h: h["routes"]["payload_bytes"].__setitem__(0, top + 1),
         f"should be an int in [0, {top}]"),
        (lambda h: h["routes"]["payload_bytes"].__setitem__(0, True), "should be an int"),
        (lambda h: h["routes"]["payload_bytes"].__setitem__(1, 3), "its zstd frame holds"),
        (lambda h: h["routes"].update(layout="token"), "layout 'token'"),
        (lambda h: h["routes"].update(widths=[41]), "entropy routes have no field widths"),
        (lambda h: h.update(topk_order="router"), "entropy mode for a trace whose rows are not"),
        (lambda h: h.update(num_experts=5000), "mode 'entropy' cannot encode E=5000"),
    ]:
        hh = json.loads(json.dumps(h))
        change(hh)
        with pytest.raises(CodecError) as e:
            decode(_with_header(hh, rest))
        assert text in str(e.value), (text, str(e.value))


def _hand_made(syms, freq, E=4, K=2, L=1):
    """A payload coding the given gaps with these tables (identity popularity orders)."""
    freq = np.asarray(freq, np.int64)
    cum = entropy.cumulative(freq)
    tab = np.array([j % K for j in range(len(syms))], np.int64)
    x, words = entropy.rans_encode_py(tab, np.asarray(syms, np.int64), freq, cum)
    perm = np.tile(np.arange(E), (L, 1))
    return entropy.tables_bytes(perm, freq, E) + np.array(x, "<u4").tobytes() + \
        words.astype("<u2").tobytes()


def test_a_rank_past_e_is_an_invalid_row(kernels):
    # E = 4, K = 2: gaps 0..2 in each table. Row 0 codes gaps (0, 2): ranks 0, 3 (valid);
    # row 1 codes (2, 2): ranks 2, then 5, past E
    half = entropy.PROB_SCALE // 2
    freq = [[half, 0, half], [half, 0, half]]
    out = np.zeros((2, 2), np.uint8)
    good = _hand_made([0, 2, 2, 0], freq)
    assert entropy_kernels.decode_block(good, 2, 1, 4, np.zeros(0, bool), out) == -1
    assert out.tolist() == [[0, 3], [2, 3]]
    bad = _hand_made([0, 2, 2, 2], freq)
    assert entropy_kernels.decode_block(bad, 2, 1, 4, np.zeros(0, bool), out) == 1
    # the same through the container: the error names the row
    t = RoutingTrace.from_ids(np.array([[[0, 3]], [[2, 3]]]), num_experts=4, moe_layers=[0],
                              request_id="r", prompt_len=2).with_sorted_topk()
    h, parts, tail = _plain(t)
    parts[0] = bad
    with pytest.raises(CodecError, match=r"row 1 \(token 1, layer 0\) is not a valid route"):
        decode(_rebuild(h, parts, tail))


def test_a_table_longer_than_the_gap_values_is_refused(kernels):
    p = bytearray(_hand_made([0, 0], [[entropy.PROB_SCALE, 0, 0], [entropy.PROB_SCALE, 0, 0]]))
    out = np.zeros((1, 2), np.uint8)
    assert entropy_kernels.decode_block(bytes(p), 1, 1, 4, np.zeros(0, bool), out) == -1
    assert struct.unpack_from("<H", p, 4)[0] == 1  # table 0 declares one value
    struct.pack_into("<H", p, 4, 4)  # four: more than E - K + 1 = 3
    assert entropy_kernels.decode_block(bytes(p), 1, 1, 4, np.zeros(0, bool), out) == \
        entropy.BAD_TABLES


@needs_numba
@pytest.mark.parametrize("E,K", [(16, 4), (128, 8), (300, 6), (2, 1), (8, 8)])
def test_kernel_matches_the_reference_on_mutated_payloads(monkeypatch, E, K):
    """Mutated payloads (bytes flipped, cut, spliced): numba and the reference return the same
    code, and the same rows when valid."""
    seed, rng = fuzz_rng(300 + E + K)
    T, L = 9, 3
    t = skewed(T, L, K, E, seed=E, missing=0.2)
    skip = t.missing.ravel()
    payload = entropy_kernels.encode_block(t.expert_ids, t.missing, E)
    dtype = np.uint8 if E <= 256 else np.uint16
    for i in range(150):
        b = bytearray(payload)
        op = i % 4
        if op == 0 and b:
            for _ in range(int(rng.integers(1, 4))):
                b[int(rng.integers(len(b)))] ^= 1 << int(rng.integers(8))
        elif op == 1:
            b = b[:int(rng.integers(len(b) + 1))]
        elif op == 2:
            j = int(rng.integers(len(b) + 1))
            b = b[:j] + rng.integers(0, 256, int(rng.integers(1, 6)), dtype=np.uint8).tobytes() + b[j:]
        else:  # the tail (the stream) only
            j = int(rng.integers(max(1, len(b) - 16), len(b) + 1))
            b[j:] = rng.integers(0, 256, len(b) - j, dtype=np.uint8).tobytes()
        data = bytes(b)
        got = []
        for use in (True, False):
            monkeypatch.setattr(codec_kernels, "USE_NUMBA", use)
            out = np.zeros((T * L, K), dtype)
            got.append((entropy_kernels.decode_block(data, T, L, E, skip, out), out))
        with report_failure(seed, i, data):
            assert got[0][0] == got[1][0], (got[0][0], got[1][0])
            if got[0][0] == -1:
                assert np.array_equal(got[0][1], got[1][1])


@pytest.mark.parametrize("use_numba", [True, False], ids=["numba", "numpy"])
def test_contracts_are_checked_before_any_kernel_runs(monkeypatch, use_numba):
    if use_numba and not codec_kernels.HAVE_NUMBA:
        pytest.skip("numba is not installed")
    monkeypatch.setattr(codec_kernels, "USE_NUMBA", use_numba)
    ids = np.zeros((3, 2, 4), np.uint8)
    ids[:] = [0, 1, 2, 3]
    out = np.empty((6, 4), np.uint8)
    skip = np.zeros(0, bool)
    cases = [
        (lambda: entropy_kernels.encode_block(ids, None, 3000), "entropy mode fits E=3000, K=4"),
        (lambda: entropy_kernels.encode_block(ids + 13, None, 16), "ids below E=16"),
        (lambda: entropy_kernels.encode_block(ids, np.zeros((3, 3), bool), 16),
         "missing of shape (3, 2)"),
        (lambda: entropy_kernels.decode_block(b"", 3, 2, 16, skip, out[:-1]), "out of shape (6, 4)"),
        (lambda: entropy_kernels.decode_block(b"", 3, 2, 16, np.zeros(5, bool), out),
         "skip: bool of length 0 or 6"),
        (lambda: entropy_kernels.decode_block(b"", 3, 2, 300, skip, out),
         "out of the ids' dtype at E=300"),
        (lambda: entropy_kernels.decode_block(b"", 3, 2, 3000, skip, out),
         "entropy mode fits E=3000"),
    ]
    for fn, text in cases:
        with pytest.raises(KernelContractError, match=re.escape(text)):
            fn()
