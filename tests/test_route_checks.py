import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routecap.route_checks import (BAD_DUPLICATE, BAD_PARTIAL, BAD_RANGE, _check_numpy,
                                   check_routes)


def _routes(N, L, K, E, seed):
    rng = np.random.default_rng(seed)
    return np.argsort(rng.random((N, L, E)), axis=-1)[..., :K].astype(np.int32)


def test_hand_worked_cells():
    r = _routes(3, 2, 3, 8, 0)
    assert check_routes(r, 8).bad is None
    r[2, 1] = -1                      # a missing cell: fine
    got = check_routes(r, 8)
    assert got.bad is None and got.missing_NL.tolist() == [[False, False]] * 2 + [[False, True]]
    assert got.missing_L.tolist() == [0, 1]
    r[1, 0, 2] = -1                   # partly missing
    assert check_routes(r, 8).bad == (1, 0, BAD_PARTIAL)
    r[0, 1, 0] = 8                    # out of range, earlier in row-major order
    assert check_routes(r, 8).bad == (0, 1, BAD_RANGE)
    r[0, 0, :] = [5, 5, 1]            # a duplicate, earlier still
    assert check_routes(r, 8).bad == (0, 0, BAD_DUPLICATE)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16])
def test_dtypes(dtype):
    r = _routes(4, 3, 2, 100, 1).astype(dtype)
    got = check_routes(r, 100)
    assert got.bad is None and not got.missing_NL.any()
    assert check_routes(r, 50).bad is not None or (r < 50).all()


def test_empty_and_wrong_shape():
    got = check_routes(np.zeros((0, 3, 2), np.int16), 8)
    assert got.missing_NL.shape == (0, 3) and got.bad is None
    with pytest.raises(ValueError, match=r"expected an integer array \[N, L, K\], got float32"):
        check_routes(np.zeros((2, 3, 2), np.float32), 8)


cells = st.sampled_from([-2, -1, 0, 1, 2, 3, 7, 8, 300])


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 5), st.integers(1, 4), st.integers(1, 5), st.integers(1, 9), st.data())
def test_kernel_equals_numpy_reference(N, L, K, E, data):
    flat = data.draw(st.lists(st.sampled_from([-1, -1, 0, 1, 2, 3, 4, 7, 8, 9, -5, 300]),
                              min_size=N * L * K, max_size=N * L * K))
    r = np.array(flat, np.int64).reshape(N, L, K)
    fast = check_routes(r, E)
    miss, missing_L, first, kind = _check_numpy(r, E)
    assert np.array_equal(fast.missing_NL, miss)
    assert np.array_equal(fast.missing_L, missing_L)
    assert fast.bad == (None if first < 0 else (first // L, first % L, kind))


def test_ids_equal_modulo_128_are_not_duplicates():
    r = np.array([[[5, 133, 261]], [[133, 7, 133]]], np.int32)  # E = 300
    got = check_routes(r, 300)
    assert got.bad == (1, 0, BAD_DUPLICATE)
    assert check_routes(r[:1], 300).bad is None
