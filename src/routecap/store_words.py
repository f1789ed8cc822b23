"""The vectorised row check of the store for 8 one-byte ids per cell (one uint64 a cell).

Shape legend: K top-k (8 here), E experts.

Used by :mod:`routecap.store_rows` (the step's row check and the fused copy) for top-8 routes
of up to 128 experts, or of 256: :func:`words_suspect` tells whether a range of cells holds a
bad valid cell (an id >= E, or a repeated id) without a branch per cell; the caller then finds
the cell with its scalar loop.
"""

from __future__ import annotations

import numpy as np

try:  # numba is a dependency; the plain functions keep the store usable without it
    import numba as _nb

    _HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    _HAVE_NUMBA = False

__all__ = ["words_suspect"]

# The row check for 8 one-byte ids per cell, one uint64 each (E <= 128 or E >= 256): over cells
# c0..c1-1, False when every valid cell is good (ids < E, 8 distinct), True when some valid cell
# is bad (the caller finds it with the scalar loop). No branch in the loops, so that LLVM
# vectorises them (AVX2: 4 cells an instruction, byte rotations as shuffles). The loops run
# over slices indexed from 0: indexed from c0, LLVM could not rule out negative indices (numba
# wraps them) and the loop ran 1.5x slower. A byte of x ^ rotate(x, 8j) is zero where ids j
# apart are equal; rotations by 1..4 bytes compare every pair.
#
# E <= 128: ((x + add) | x) has the top bit of a byte >= E set. When every id is < 128 the bytes
# of v = x ^ rotate(x) are 7-bit, and v + 0x7f.. sets a byte's top bit iff the byte is not zero
# (no carry between bytes): a cell is good iff its 4 sums ANDed keep every top bit, and all are
# good iff the AND over the cells does. A byte >= 128 makes its cell's sums meaningless, but the
# range word flags that cell already.

def _pairs7_py(x):  # pragma: no cover (compiled)
    s7 = np.uint64(0x7F7F7F7F7F7F7F7F)
    a = (x ^ ((x >> np.uint64(8)) | (x << np.uint64(56)))) + s7
    a &= (x ^ ((x >> np.uint64(16)) | (x << np.uint64(48)))) + s7
    a &= (x ^ ((x >> np.uint64(24)) | (x << np.uint64(40)))) + s7
    return a & ((x ^ ((x >> np.uint64(32)) | (x << np.uint64(32)))) + s7)


def _small_all_py(words, c0, c1, E):  # pragma: no cover (compiled)
    hi = np.uint64(0x8080808080808080)
    add = np.uint64(0x0101010101010101) * np.uint64(127 - (E - 1))
    orx = np.uint64(0)
    acc = hi
    w = words[c0:c1]
    for i in range(w.shape[0]):
        x = w[i]
        orx |= (x + add) | x
        acc &= _pairs7(x)
    return (orx & hi) != 0 or (acc & hi) != hi


def _small_valid_py(words, vflat, c0, c1, E):  # pragma: no cover (compiled)
    hi = np.uint64(0x8080808080808080)
    add = np.uint64(0x0101010101010101) * np.uint64(127 - (E - 1))
    orx = np.uint64(0)
    acc = hi
    w = words[c0:c1]
    vf = vflat[c0:c1]
    for i in range(w.shape[0]):
        x = w[i]
        m = np.uint64(0) - np.uint64(vf[i])  # all ones when the cell is valid
        orx |= ((x + add) | x) & m
        acc &= _pairs7(x) | ~m
    return (orx & hi) != 0 or (acc & hi) != hi


def _wide_py(words, vflat, has_valid, c0, c1):  # pragma: no cover (compiled)
    # E >= 256: every byte is in range; (v - 0x01..) & ~v has the top bit of some byte set iff
    # v has a zero byte (bits above the first zero byte may be set too: masked at the end)
    lo = np.uint64(0x0101010101010101)
    f = np.uint64(0)
    w = words[c0:c1]
    vf = vflat[c0:c1] if has_valid else vflat
    for i in range(w.shape[0]):
        x = w[i]
        v = x ^ ((x >> np.uint64(8)) | (x << np.uint64(56)))
        z = (v - lo) & ~v
        v = x ^ ((x >> np.uint64(16)) | (x << np.uint64(48)))
        z |= (v - lo) & ~v
        v = x ^ ((x >> np.uint64(24)) | (x << np.uint64(40)))
        z |= (v - lo) & ~v
        v = x ^ ((x >> np.uint64(32)) | (x << np.uint64(32)))
        z |= (v - lo) & ~v
        if has_valid:
            z &= np.uint64(0) - np.uint64(vf[i])
        f |= z
    return (f & np.uint64(0x8080808080808080)) != 0


def words_suspect_py(words, vflat, has_valid, c0, c1, E):  # pragma: no cover (compiled)
    if E > 128:
        return _wide(words, vflat, has_valid, c0, c1)
    if has_valid:
        return _small_valid(words, vflat, c0, c1, E)
    return _small_all(words, c0, c1, E)


if _HAVE_NUMBA:
    _pairs7 = _nb.njit(inline="always")(_pairs7_py)
    _small_all = _nb.njit(cache=True, nogil=True)(_small_all_py)
    _small_valid = _nb.njit(cache=True, nogil=True)(_small_valid_py)
    _wide = _nb.njit(cache=True, nogil=True)(_wide_py)
    words_suspect = _nb.njit(inline="always")(words_suspect_py)
else:  # pragma: no cover
    _pairs7, _small_all, _small_valid, _wide = _pairs7_py, _small_all_py, _small_valid_py, _wide_py
    words_suspect = words_suspect_py
