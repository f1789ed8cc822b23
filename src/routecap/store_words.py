"""The vectorised row check of the store for 8 one-byte ids per cell (one uint64 a cell).

Shape legend: K top-k (8 here), E experts, L MoE layers.

Used by :mod:`routecap.store_rows` for top-8 routes of up to 128 experts, or of 256:
:func:`words_suspect` tells whether a range of cells holds a bad valid cell (an id >= E, or a
repeated id), and :func:`copy_check_words` does the same over runs of rows while it copies them
into the pool, in one pass over the bytes. Neither has a branch per cell; the caller then finds
the bad cell with its scalar loop.
"""

from __future__ import annotations

import numpy as np

try:  # numba is a dependency; the plain functions keep the store usable without it
    import numba as _nb

    _HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    _HAVE_NUMBA = False

__all__ = ["copy_check_words", "words_suspect"]

# One formula per word, OR-accumulated over the cells: a byte's top bit ends up set iff some
# valid cell is bad. A byte of x ^ rotate(x, 8j) is zero where ids j apart are equal; rotations
# by 1..4 bytes compare every pair.
#
# E <= 128: ((x + add) | x) has the top bit of a byte >= E set. When every id is < 128 the bytes
# of v = x ^ rotate(x) are 7-bit, and v + 0x7f.. sets a byte's top bit iff the byte is not zero
# (no carry between bytes): ~AND of the 4 sums has a top bit set iff two ids are equal. A byte
# >= 128 makes its cell's sums meaningless, but the range term flags that cell already.
# E >= 256 (every byte is in range): (v - 0x01..) & ~v has the top bit of some byte set iff v
# has a zero byte (bits above the first zero byte may be set too; the cell is bad either way).
#
# The loops come in one variant per (range test, validity mask, copy or not), made from one
# source with those as closure constants: numba freezes them, so each variant's loop has no
# branch and LLVM vectorises it (AVX2: 4 cells an instruction, byte rotations as shuffles). A
# branch on them inside the loop made it 2x slower. The loops run over slices indexed from 0:
# indexed from an offset, LLVM could not rule out negative indices (numba wraps them) and the
# loop ran 1.5x slower.

_HI = 0x8080808080808080


def _pairs7_py(x):  # pragma: no cover (compiled)
    s7 = np.uint64(0x7F7F7F7F7F7F7F7F)
    a = (x ^ ((x >> np.uint64(8)) | (x << np.uint64(56)))) + s7
    a &= (x ^ ((x >> np.uint64(16)) | (x << np.uint64(48)))) + s7
    a &= (x ^ ((x >> np.uint64(24)) | (x << np.uint64(40)))) + s7
    return a & ((x ^ ((x >> np.uint64(32)) | (x << np.uint64(32)))) + s7)


def _zero_pairs_py(x):  # pragma: no cover (compiled)
    lo = np.uint64(0x0101010101010101)
    v = x ^ ((x >> np.uint64(8)) | (x << np.uint64(56)))
    z = (v - lo) & ~v
    v = x ^ ((x >> np.uint64(16)) | (x << np.uint64(48)))
    z |= (v - lo) & ~v
    v = x ^ ((x >> np.uint64(24)) | (x << np.uint64(40)))
    z |= (v - lo) & ~v
    v = x ^ ((x >> np.uint64(32)) | (x << np.uint64(32)))
    return z | ((v - lo) & ~v)


if _HAVE_NUMBA:
    _pairs7 = _nb.njit(inline="always")(_pairs7_py)
    _zero_pairs = _nb.njit(inline="always")(_zero_pairs_py)
else:  # pragma: no cover
    _pairs7, _zero_pairs = _pairs7_py, _zero_pairs_py


def _word_loop(wide: bool, has_valid: bool, store: bool):
    """``f | bad bits`` of the words of ``src`` (valid ones only if ``has_valid``: ``vf`` holds
    their flags), copying them into ``dst`` if ``store``."""

    def loop(dst, src, vf, add, f):  # pragma: no cover (compiled)
        for i in range(src.shape[0]):
            x = src[i]
            if store:
                dst[i] = x
            z = _zero_pairs(x) if wide else (x + add) | x | ~_pairs7(x)
            if has_valid:
                z &= np.uint64(0) - np.uint64(vf[i])  # all ones when the cell is valid
            f |= z
        return f

    return _nb.njit(inline="always")(loop) if _HAVE_NUMBA else loop


_CHECK = [[_word_loop(w, v, False) for v in (False, True)] for w in (False, True)]
_COPY = [[_word_loop(w, v, True) for v in (False, True)] for w in (False, True)]
_check_s, _check_sv = _CHECK[0]
_check_w, _check_wv = _CHECK[1]
_copy_s, _copy_sv = _COPY[0]
_copy_w, _copy_wv = _COPY[1]


def _add_for_py(E):  # pragma: no cover (compiled)
    return np.uint64(0x0101010101010101) * np.uint64(127 - (E - 1) if E <= 128 else 0)


_add_for = _nb.njit(inline="always")(_add_for_py) if _HAVE_NUMBA else _add_for_py


def words_suspect_py(words, vflat, has_valid, c0, c1, E):  # pragma: no cover (compiled)
    """True iff cells ``c0..c1-1`` hold a bad valid cell (``vflat``: their flags if
    ``has_valid``, else unused)."""
    add = _add_for(E)
    w = words[c0:c1]
    f = np.uint64(0)
    if has_valid:
        vf = vflat[c0:c1]
        f = _check_wv(w, w, vf, add, f) if E > 128 else _check_sv(w, w, vf, add, f)
    else:
        f = _check_w(w, w, vflat, add, f) if E > 128 else _check_s(w, w, vflat, add, f)
    return (f & np.uint64(_HI)) != 0


def copy_check_words_py(dst_words, src_words, vflat, has_valid, d, s, n, L, E):
    """Copy runs of rows (run q: ``n[q]`` rows of ``L`` words from row ``s[q]`` of the step to
    row ``d[q]`` of the pool) and tell whether any valid cell copied is bad, in one pass.

    Writes ids only; the caller sets validity once the answer is False. Bounds: the caller's
    (:func:`routecap.store_rows.copy_check_runs` asserts them).
    """
    add = _add_for(E)
    f = np.uint64(0)
    for q in range(d.shape[0]):
        m = n[q] * L
        c0 = s[q] * L
        dst = dst_words[d[q] * L:d[q] * L + m]
        src = src_words[c0:c0 + m]
        if has_valid:
            vf = vflat[c0:c0 + m]
            f = _copy_wv(dst, src, vf, add, f) if E > 128 else _copy_sv(dst, src, vf, add, f)
        else:
            f = _copy_w(dst, src, vflat, add, f) if E > 128 else _copy_s(dst, src, vflat, add, f)
    return (f & np.uint64(_HI)) != 0


if _HAVE_NUMBA:
    words_suspect = _nb.njit(inline="always")(words_suspect_py)
    copy_check_words = _nb.njit(inline="always")(copy_check_words_py)
else:  # pragma: no cover
    words_suspect, copy_check_words = words_suspect_py, copy_check_words_py
