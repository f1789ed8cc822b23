"""The codec's compiled kernels: bounds checking, their contracts, and numba against numpy.

numba reads ``NUMBA_BOUNDSCHECK`` once, at import: the test that must run with bounds checking
starts its own interpreter (with its own cache folder, so that kernels compiled without checks
are not reused). ``make test`` also runs this file and the other codec tests a second time under
``NUMBA_BOUNDSCHECK=1``, where an index past an array raises IndexError instead of reading
memory the kernel does not own.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import routecap
from fuzzing import fuzz_rng, report_failure
from routecap.codec import kernels, ranking
from routecap.codec.kernels import KernelContractError

needs_numba = pytest.mark.skipif(not kernels.HAVE_NUMBA, reason="numba is not installed")

# Valid encodings of every mode at several (E, K): ids mode at E=16/K=4, E=300/K=6, E=65536/K=8
# raised IndexError in the ids-mode kernel under bounds checking before the fix (it read
# comb[K, E] from a placeholder table of 2 columns: at random, a segfault without the checks).
_DECODE_VALID = textwrap.dedent("""
    import numba, numpy as np
    from routecap.codec import decode, encode, inspect as codec_inspect
    from routecap.trace import RoutingTrace
    assert numba.config.BOUNDSCHECK, "NUMBA_BOUNDSCHECK was not picked up"
    rng = np.random.default_rng(0)
    cases = [(16, 4, "ids"), (300, 6, "ids"), (65536, 8, "ids"), (256, 8, "ids"), (2, 1, "ids"),
             (16, 4, "set"), (128, 8, "set"), (300, 6, "order"), (40, 10, "order"),
             (256, 8, "raw"), (65536, 3, "set"), (128, 8, "entropy"), (300, 6, "entropy"),
             (2, 1, "entropy")]
    for E, K, mode in cases:
        T, L = 23, 3
        ids = np.array([rng.permutation(E)[:K] for _ in range(T * L)]).reshape(T, L, K)
        miss = rng.random((T, L)) < 0.2
        t = RoutingTrace.from_ids(ids, num_experts=E, moe_layers=[0, 1, 2], request_id="r",
                                  prompt_len=T, missing=miss)
        if mode in ("set", "entropy"):
            t = t.with_sorted_topk()
        for block in (5, 16384):
            back = decode(encode(t, mode=mode, fallback=False, block_tokens=block))
            assert back.equals(t), (E, K, mode, block)
            assert codec_inspect(encode(t, mode=mode, fallback=False))["routes"]["mode"] == mode
    print("decoded", len(cases), "cases")
""")


def test_valid_encodings_decode_under_boundscheck(request):
    """Every mode, ids and entropy included, decodes valid encodings with numba's bounds checks
    on."""
    if not kernels.HAVE_NUMBA:
        pytest.skip("numba is not installed")
    cache = Path(request.config.cache.mkdir("numba-boundscheck"))  # kept between runs
    src = str(Path(routecap.__file__).resolve().parents[1])
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", NUMBA_CACHE_DIR=str(cache),
               PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-c", _DECODE_VALID], env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "decoded 14 cases" in p.stdout


def test_boundscheck_is_on_when_asked():
    """The second run of ``make test`` really checks bounds (numba read the variable)."""
    if not kernels.HAVE_NUMBA:
        pytest.skip("numba is not installed")
    import numba

    asked = os.environ.get("NUMBA_BOUNDSCHECK", "") == "1"
    assert bool(numba.config.BOUNDSCHECK) == asked


# ---- contracts at the kernel boundary -------------------------------------------------------------
def _block(T=3, L=2, K=4, E=16, mode="set"):
    widths = ranking.widths_of(mode, E, K)
    data = bytes(T * ranking.token_bytes(L, widths))
    return data, widths, np.empty((T * L, K), np.uint8), np.zeros(0, bool)


@pytest.mark.parametrize("use_numba", [True, False], ids=["numba", "numpy"])
def test_contracts_are_checked_before_any_kernel_runs(monkeypatch, use_numba):
    if use_numba and not kernels.HAVE_NUMBA:
        pytest.skip("numba is not installed")
    monkeypatch.setattr(kernels, "USE_NUMBA", use_numba)
    data, widths, out, skip = _block()
    ok = kernels.decode_packed_block(data, "set", widths, 3, 2, 16, True, skip, out)
    assert ok == -1  # all-zero ranks: row {0, 1, 2, 3}, valid
    cases = [
        (lambda: kernels.decode_packed_block(data[:-1], "set", widths, 3, 2, 16, True, skip, out),
         "bytes for 3 tokens"),
        (lambda: kernels.decode_packed_block(data, "set", widths, 3, 2, 16, True, skip, out[:-1]),
         "out of shape (6, 4)"),
        (lambda: kernels.decode_packed_block(data, "set", widths, 3, 2, 16, True,
                                             np.zeros(5, bool), out), "skip: bool of length 0 or 6"),
        (lambda: kernels.decode_packed_block(data, "set", [7], 3, 2, 16, True, skip, out),
         "widths of set"),
        (lambda: kernels.decode_packed_block(data, "zip", widths, 3, 2, 16, True, skip, out),
         "a packed mode"),
        (lambda: kernels.decode_packed_block(bytes(3 * 80), "set", [59], 3, 2, 1 << 16, True,
                                             np.zeros(0, bool), np.empty((6, 6), np.uint16)),
         "widths of set"),
        (lambda: kernels.decode_raw_block(np.zeros(23, np.uint8), False, 3, 2, 16, True, skip, out),
         "24 raw ids"),
        (lambda: kernels.rank_rows(np.array([[0, 16]]), 16, False), "ids below E=16"),
        (lambda: kernels.rank_rows(np.array([[0, 1, 2, 3, 4]]), 1 << 16, True), "ranks of E=65536, K=5"),
        (lambda: kernels.pack_rows(np.zeros((5, 1), np.uint64), [10], 3, 2), "fields of shape (6, 1)"),
        (lambda: kernels.pack_rows(np.zeros((6, 1), np.uint64), [60], 3, 2), "widths in [1, 57]"),
    ]
    for fn, text in cases:
        with pytest.raises(KernelContractError, match=re.escape(text)):
            fn()


# ---- numba against the numpy reference on hostile bytes --------------------------------------------
BLOCK_SHAPES = [  # (E, K, mode): packed modes at the widths' edges
    (16, 4, "set"), (16, 4, "order"), (16, 4, "ids"), (128, 8, "set"), (256, 8, "order"),
    (300, 6, "ids"), (300, 6, "set"), (65536, 8, "ids"), (65536, 3, "set"), (40, 10, "order"),
    (2, 1, "set"), (2, 1, "ids"), (1, 1, "order"), (40, 38, "set"), (24, 18, "order"),
]


@needs_numba
@pytest.mark.parametrize("E,K,mode", BLOCK_SHAPES)
def test_kernels_match_the_reference_on_random_bytes(monkeypatch, E, K, mode):
    """Random packed bytes (mostly invalid rows, some all-ones fields at the top of the range):
    numba and numpy flag the same first bad row and write the same ids."""
    seed, rng = fuzz_rng(10 + E + K)
    T, L = 7, 3
    widths = ranking.widths_of(mode, E, K)
    if mode != "ids" and not ranking.mode_fits(mode, E, K):
        pytest.skip(f"{mode} does not fit E={E}, K={K}")
    size = T * ranking.token_bytes(L, widths)
    dtype = np.uint8 if E <= 256 else np.uint16
    for i in range(60):
        kind = i % 3
        if kind == 0:
            data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        elif kind == 1:
            data = b"\xff" * size
        else:  # small values: valid rows with some invalid ones between them
            data = (rng.integers(0, 256, size, dtype=np.uint8) & rng.choice(
                np.array([0, 1, 3], np.uint8), size)).tobytes()
        skip = rng.random(T * L) < 0.3 if i % 2 else np.zeros(0, bool)
        for sorted_rows in ((True,) if mode == "set" else (True, False)):
            got = {}
            for use in (True, False):
                monkeypatch.setattr(kernels, "USE_NUMBA", use)
                out = np.full((T * L, K), 7, dtype)
                bad = kernels.decode_packed_block(data, mode, widths, T, L, E, sorted_rows, skip,
                                                  out)
                got[use] = (bad, out)
            with report_failure(seed, i, data):
                assert got[True][0] == got[False][0], (got[True][0], got[False][0])
                # rows before the first bad one must agree; the reference zeroes bad rows too
                n = T * L if got[True][0] < 0 else got[True][0]
                assert np.array_equal(got[True][1][:n], got[False][1][:n])


@needs_numba
def test_raw_kernel_matches_the_reference(monkeypatch):
    seed, rng = fuzz_rng(77)
    T, L, K = 9, 4, 3
    for i in range(100):
        E = int(rng.choice([3, 5, 16, 256, 300]))
        dtype = np.uint8 if E <= 256 else np.uint16
        src = rng.integers(0, min(E + 2, np.iinfo(dtype).max), T * L * K).astype(dtype)
        skip = rng.random(T * L) < 0.3 if i % 2 else np.zeros(0, bool)
        for layer_major in (True, False):
            for sorted_rows in (True, False):
                got = []
                for use in (True, False):
                    monkeypatch.setattr(kernels, "USE_NUMBA", use)
                    out = np.empty((T * L, K), dtype)
                    got.append((kernels.decode_raw_block(src, layer_major, T, L, E, sorted_rows,
                                                         skip, out), out))
                with report_failure(seed, i, src.tobytes()):
                    assert got[0][0] == got[1][0]
                    n = T * L if got[0][0] < 0 else got[0][0]
                    assert np.array_equal(got[0][1][:n], got[1][1][:n])


def test_lut_covers_every_rank():
    """The unranking tables' contract: for x < C(E, i), x >> shifts[i] indexes the table and the
    table's entry c has C(c, i) <= x (the kernel then only steps c up, to at most E - 1)."""
    for E, K in [(16, 4), (128, 8), (256, 8), (300, 6), (65536, 3), (40, 38)]:
        comb, lut, shifts = ranking.tables(E, K)
        assert comb.shape == (K + 1, E + 2) and lut.shape == (K + 1, 1 << ranking.LUT_BITS)
        for i in range(1, K + 1):
            top = math.comb(E, i) - 1
            assert top >> int(shifts[i]) < lut.shape[1]
            for x in (0, top // 3, top):
                c = int(lut[i, x >> int(shifts[i])])
                assert c <= E and math.comb(c, i) <= x
