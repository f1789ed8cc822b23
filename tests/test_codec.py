"""The wire codec: round trips, size against the information bound, errors, and a fuzz."""

from __future__ import annotations

import json
import math
import struct
import zlib

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzzing import fuzz_rng, report_failure
from routecap import codec
from routecap.codec import CodecError, decode, encode, inspect
from routecap.codec import kernels as codec_kernels
from routecap.codec.ranking import token_bytes
from routecap.trace import RoutingTrace, validate_trace


def make(T, L, K, E, *, seed=0, missing=0.0, tokens=True, repeat=0.0):
    """A trace of random K-subsets; ``repeat``: chance a row copies the previous token's."""
    rng = np.random.default_rng(seed)
    ids = np.array([rng.permutation(E)[:K] for _ in range(T * L)], np.int64).reshape(T, L, K)
    for t in range(1, T):
        same = rng.random(L) < repeat
        ids[t, same] = ids[t - 1, same]
    miss = rng.random((T, L)) < missing if missing else None
    return RoutingTrace.from_ids(
        ids, num_experts=E, moe_layers=list(range(1, L + 1)), request_id=f"r{seed}",
        prompt_len=T, start=3, model="m", missing=miss,
        token_ids=np.arange(T, dtype=np.int32) if tokens else None, extra={"k": [1, 2]})


SHAPES = [  # (T, L, K, E)
    (40, 3, 4, 16), (25, 4, 8, 128), (20, 2, 8, 256), (9, 2, 6, 300), (5, 1, 8, 8),
    (3, 1, 1, 1), (4, 1, 8, 65536), (0, 3, 4, 16), (7, 2, 10, 40), (2, 1, 68, 70),
]


@pytest.mark.parametrize("T,L,K,E", SHAPES)
@pytest.mark.parametrize("mode", ["order", "ids", "raw", "set"])
def test_roundtrip(kernels, T, L, K, E, mode):
    t = make(T, L, K, E, missing=0.2, seed=T + K)
    if mode == "set":
        t = t.with_sorted_topk()
    for fallback in (True, False):
        for block in (3, codec.BLOCK_TOKENS):
            blob = encode(t, mode=mode, fallback=fallback, block_tokens=block)
            back = decode(blob)
            assert back.equals(t), (mode, fallback, block)
            validate_trace(back)


def test_numba_and_numpy_agree_byte_for_byte(monkeypatch):
    if not codec_kernels.HAVE_NUMBA:
        pytest.skip("numba is not installed")
    for T, L, K, E in SHAPES:
        t = make(T, L, K, E, missing=0.1, seed=1)
        for tr, mode in ((t, "order"), (t, "ids"), (t.with_sorted_topk(), "set")):
            monkeypatch.setattr(codec_kernels, "USE_NUMBA", True)
            a = encode(tr, mode=mode, fallback=False, block_tokens=4)
            monkeypatch.setattr(codec_kernels, "USE_NUMBA", False)
            b = encode(tr, mode=mode, fallback=False, block_tokens=4)
            assert a == b, (T, L, K, E, mode)


@pytest.mark.parametrize("E,K,limit", [(128, 8, 0.65), (256, 8, 0.78)])
def test_packed_rows_within_three_percent_of_the_bound(E, K, limit):
    L, T = 48, 200
    t = make(T, L, K, E, tokens=False)
    for mode, tr, bound in (
        ("set", t.with_sorted_topk(), math.log2(math.comb(E, K))),
        ("order", t, math.log2(math.comb(E, K) * math.factorial(K))),
    ):
        widths = inspect(encode(tr, mode=mode, fallback=False))["routes"]["widths"]
        packed_bits_per_row = 8 * token_bytes(L, widths) / L
        assert packed_bits_per_row <= 1.03 * bound, (mode, packed_bits_per_row, bound)
        if mode == "set":
            assert packed_bits_per_row / (8 * K) <= limit


@pytest.mark.parametrize("repeat", [0.0, 0.5, 0.95])
@pytest.mark.parametrize("E,K", [(128, 8), (256, 8), (16, 2)])
def test_never_larger_than_raw_plus_zstd(E, K, repeat):
    t = make(300, 6, K, E, repeat=repeat, tokens=False, seed=7)
    for tr, mode in ((t, "order"), (t.with_sorted_topk(), "set"), (t.with_sorted_topk(), "entropy")):
        # raw ids of the trace being encoded (sorted in the set modes) + zstd
        baseline = len(zstandard.ZstdCompressor(level=3).compress(tr.expert_ids.tobytes()))
        h = inspect(blob := encode(tr, mode=mode))
        routes = next(s for s in h["sections"] if s["name"] == "routes")
        assert routes["bytes"] <= baseline, (mode, routes["bytes"], baseline)
        assert len(blob) < baseline + 1024  # the header is small


def test_set_mode_needs_sorted_rows():
    with pytest.raises(ValueError, match="mode='set' drops the order"):
        encode(make(3, 1, 2, 8), mode="set")
    with pytest.raises(ValueError, match="mode must be one of"):
        encode(make(3, 1, 2, 8), mode="zip")
    with pytest.raises(TypeError, match="expected a RoutingTrace"):
        encode(b"nope")


def _header_and_rest(blob):
    H = struct.unpack_from("<I", blob, 6)[0]
    return json.loads(blob[10:10 + H]), blob[10 + H:]


def _with_header(h, rest):
    raw = json.dumps(h).encode()
    return b"RCAP" + struct.pack("<BBI", 1, 0, len(raw)) + raw + rest


@pytest.fixture
def blob():
    return encode(make(30, 3, 4, 16, missing=0.1), mode="order", fallback=False,
                  block_tokens=8)


def test_errors_name_the_problem(blob):
    cases = {
        b"": "truncated: 0 bytes",
        b"XXXX" + blob[4:]: "bad magic",
        blob[:4] + b"\x02" + blob[5:]: "wire version 2 is not the version this routecap reads "
                                       "(1); upgrade routecap",
        blob[:-3]: "truncated",
        blob + b"extra": "5 unexpected bytes after the last section",
        blob[:10] + b"#" + blob[11:]: "corrupt header",
    }
    for data, text in cases.items():
        with pytest.raises(CodecError) as e:
            decode(data)
        assert text in str(e.value), (text, str(e.value))
    with pytest.raises(TypeError, match="expected bytes"):
        decode("a string")


def test_lying_headers(blob):
    h, rest = _header_and_rest(blob)
    for change, text in [
        (lambda h: h.update(num_tokens=10**9), "refusing 1000000000 x 3 x 4 ids"),
        (lambda h: h.update(num_tokens=100), "corrupt section 'missing': 12 bytes, expected 38"),
        (lambda h: h["routes"].update(mode="set"), "set mode for a trace whose rows are not sorted"),
        (lambda h: h["routes"].update(widths=[3, 3]), "field widths"),
        (lambda h: h["routes"]["blocks"].pop(), "need 4 blocks"),
        (lambda h: h.update(moe_layers=[]), "moe_layers"),
        (lambda h: h.update(num_experts=0), "num_experts"),
        (lambda h: h.update(top_k=99), "top_k"),
        (lambda h: h.update(request_id=5), "request_id"),
        (lambda h: h["routes"].update(layout="layer"), "layout"),
        (lambda h: h["sections"][0].update(bytes=1), "checksum mismatch"),
    ]:
        hh = json.loads(json.dumps(h))
        change(hh)
        with pytest.raises(CodecError) as e:
            decode(_with_header(hh, rest))
        assert text in str(e.value), (text, str(e.value))


def test_rank_out_of_range_is_caught():
    # one row whose packed rank is >= C(E, K): set every bit of the first row's fields
    t = make(2, 1, 2, 8, tokens=False)
    blob = encode(t, mode="order", fallback=False)
    h, rest = _header_and_rest(blob)
    assert h["routes"]["blocks"][0][1] == "none"  # tiny: stored uncompressed, with a CRC-32
    n = h["routes"]["blocks"][0][0]
    bad = bytes([0xFF]) + rest[1:]
    h["routes"]["blocks"][0][2] = zlib.crc32(bad[:n])
    with pytest.raises(CodecError, match="row 0 .* is not a valid route"):
        decode(_with_header(h, bad))


def test_missing_rows_and_metadata_survive():
    t = make(10, 2, 4, 64, missing=0.5, seed=3)
    back = decode(encode(t))
    assert back.missing is not None and np.array_equal(back.missing, t.missing)
    assert back.extra == {"k": [1, 2]} and back.start == 3 and back.model == "m"


# ---- fuzz ------------------------------------------------------------------------------------
def _seeds():
    out = []
    for i, (T, L, K, E) in enumerate(SHAPES[:7]):
        t = make(T, L, K, E, missing=0.2 if i % 2 else 0.0, seed=i, tokens=i % 3 != 0)
        out.append(encode(t, mode="order", fallback=False, block_tokens=5))
        out.append(encode(t.with_sorted_topk(), mode="set", block_tokens=5))
        out.append(encode(t.with_sorted_topk(), mode="entropy", fallback=False, block_tokens=5))
        out.append(encode(t, mode="ids", fallback=False))
        out.append(encode(t, mode="raw"))
    return out


def _mutate(rng, data: bytes, seeds) -> bytes:
    b = bytearray(data)
    op = rng.integers(8)
    if op == 0 and b:  # flip bits
        for _ in range(int(rng.integers(1, 4))):
            i = int(rng.integers(len(b)))
            b[i] ^= 1 << int(rng.integers(8))
    elif op == 1 and b:  # random bytes
        i = int(rng.integers(len(b)))
        b[i:i + int(rng.integers(1, 9))] = rng.integers(0, 256, int(rng.integers(1, 9)),
                                                        dtype=np.uint8).tobytes()
    elif op == 2:  # truncate
        b = b[:int(rng.integers(len(b) + 1))]
    elif op == 3:  # splice two encodings
        other = seeds[int(rng.integers(len(seeds)))]
        cut = int(rng.integers(len(b) + 1))
        b = b[:cut] + other[int(rng.integers(len(other) + 1)):]
    elif op == 4:  # duplicate a slice
        i, j = sorted(rng.integers(0, len(b) + 1, 2))
        b = b[:j] + b[i:j] + b[j:]
    else:  # a structured lie in the header, lengths kept consistent so decoding goes deeper
        try:
            h, rest = _header_and_rest(bytes(b))
        except Exception:  # noqa: BLE001
            return bytes(b)
        if not isinstance(h, dict):
            return bytes(b)
        key = ["num_tokens", "top_k", "num_experts", "start", "prompt_len", "moe_layers",
               "routes", "topk_order"][int(rng.integers(8))]
        vals = [0, 1, 2, 3, 7, 255, 256, 65536, 2**31, -1, None, "x", [], [0, 0], {}, 1.5,
                True, [1, 2, 3]]
        if key == "routes" and isinstance(h.get("routes"), dict):
            sub = ["mode", "widths", "layout", "block_tokens", "blocks",
                   "payload_bytes"][int(rng.integers(6))]
            h["routes"][sub] = vals[int(rng.integers(len(vals)))]
        else:
            h[key] = vals[int(rng.integers(len(vals)))]
        b = bytearray(_with_header(h, rest))
    return bytes(b)


@pytest.mark.parametrize("n_inputs", [4_000, pytest.param(100_000, marks=pytest.mark.slow)])
def test_fuzz_decoder_only_clean_errors(n_inputs):
    """Mutated encodings of every mode: each decodes to a valid trace or raises CodecError.

    The 100,000-input run is in the slow part; ``make test`` runs it again under
    ``NUMBA_BOUNDSCHECK=1``, where a kernel indexing past an array raises instead of reading
    memory it does not own.
    """
    seeds = _seeds()
    seed, rng = fuzz_rng(2026)
    outcomes = {"ok": 0, "error": 0}
    for i in range(n_inputs):
        data = seeds[i % len(seeds)]
        for _ in range(int(rng.integers(1, 4))):
            data = _mutate(rng, data, seeds)
        with report_failure(seed, i, data):
            try:
                t = decode(data)
            except CodecError:
                outcomes["error"] += 1
                continue
            validate_trace(t)  # what decodes must satisfy the contract
            outcomes["ok"] += 1
    assert outcomes["error"] > n_inputs // 2 and outcomes["ok"] > 0, outcomes


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(data):
    with pytest.raises(CodecError):
        decode(b"RCAP" + data)


def test_sorted_trace_in_order_mode_must_have_identity_orders():
    t = make(2, 1, 2, 8, tokens=False).with_sorted_topk()
    blob = encode(t, mode="order", fallback=False)
    h, rest = _header_and_rest(blob)
    assert h["routes"]["blocks"][0][1] == "none"
    # set the order code of row 0 to 1 (a non-identity order); fix the block's CRC
    n = h["routes"]["blocks"][0][0]
    b = bytearray(rest[:n])
    w_set = h["routes"]["widths"][0]
    b[w_set // 8] |= 1 << (w_set % 8)
    h["routes"]["blocks"][0][2] = zlib.crc32(bytes(b))
    with pytest.raises(CodecError, match="row 0 .* is not a valid route"):
        decode(_with_header(h, bytes(b) + rest[n:]))


def test_set_mode_with_large_k():
    t = make(3, 2, 21, 32, tokens=False).with_sorted_topk()
    assert decode(encode(t)).equals(t)


def test_small_sections_are_sized_by_the_trace_before_decompression():
    t = make(400, 3, 4, 16, tokens=False)
    miss = np.zeros((400, 3), bool)
    miss[:300] = True  # a compressible mask: stored with zstd
    t = RoutingTrace.from_ids(t.expert_ids, num_experts=16, moe_layers=[1, 2, 3],
                              request_id="m", prompt_len=1, missing=miss)
    h, rest = _header_and_rest(encode(t))
    sec = next(s for s in h["sections"] if s["name"] == "missing")
    assert sec["codec"] == "zstd"
    sec["raw_bytes"] = 1 << 30  # a lie: a gigabyte
    with pytest.raises(CodecError, match="declares 1073741824 bytes, the trace's shape needs"):
        decode(_with_header(h, rest))


def test_float_field_widths_are_refused(blob):
    h, rest = _header_and_rest(blob)
    h["routes"]["widths"] = [float(w) for w in h["routes"]["widths"]]
    with pytest.raises(CodecError, match="field widths"):
        decode(_with_header(h, rest))


def test_fuzz_seed_is_replayable_and_the_failing_input_printed(monkeypatch, capsys):
    import base64

    monkeypatch.setenv("ROUTECAP_FUZZ_SEED", "4242")
    seed, rng = fuzz_rng(2026)
    assert seed == 4242 and rng.integers(1 << 30) == np.random.default_rng(4242).integers(1 << 30)
    with pytest.raises(ZeroDivisionError):
        with report_failure(seed, 17, b"\x00RCAP"):
            1 / 0  # noqa: B018
    out = capsys.readouterr().out
    assert "fuzz seed 4242 (replay: ROUTECAP_FUZZ_SEED=4242)" in out
    assert "fuzz input 17 of seed 4242 failed" in out and base64.b64encode(b"\x00RCAP").decode() in out
    monkeypatch.setenv("ROUTECAP_FUZZ_SEED", "x")
    with pytest.raises(ValueError, match="ROUTECAP_FUZZ_SEED should be an int, got 'x'"):
        fuzz_rng(1)
