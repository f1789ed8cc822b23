import numpy as np
import pytest

from routecap.store import RouteStore, StoreError


def rows(values, L=1, K=2):
    """Rows whose ids are [v, v+1] at every layer: easy to read in expected values."""
    return np.array([[[v, v + 1]] * L for v in values], np.uint8).reshape(len(values), L, K)


def test_write_take_roundtrip():
    s = RouteStore(num_layers=1, top_k=2, num_experts=16)
    s.write("a", 0, rows([1, 2, 3]))
    ids, missing = s.take("a")
    assert missing is None and ids[:, 0, 0].tolist() == [1, 2, 3]
    ids, missing = s.take("a", 1, 3)
    assert ids[:, 0, 0].tolist() == [2, 3]


def test_rewrite_drops_everything_after_the_restart():
    # positions:  0 1 2 3 4        written first
    #                 2 3          rewritten (a cropped cache): 4 must not survive
    s = RouteStore(num_layers=1, top_k=2, num_experts=16)
    s.write("a", 0, rows([1, 2, 3, 4, 5]))
    s.write("a", 2, rows([9, 10]))
    assert s.length("a") == 4
    ids, missing = s.take("a", 0, 5)
    assert ids[:4, 0, 0].tolist() == [1, 2, 9, 10]
    assert missing[:, 0].tolist() == [False, False, False, False, True]
    assert ids[4].tolist() == [[0, 0]]


def test_gap_is_missing_not_zero():
    s = RouteStore(num_layers=2, top_k=2, num_experts=16)
    s.write("a", 3, rows([7], L=2))
    ids, missing = s.take("a")
    assert missing.tolist() == [[True, True]] * 3 + [[False, False]]


def test_invalid_cells_are_missing():
    s = RouteStore(num_layers=2, top_k=2, num_experts=16)
    s.write("a", 0, rows([1, 2], L=2), np.array([[True, False], [True, True]]))
    _, missing = s.take("a")
    assert missing.tolist() == [[False, True], [False, False]]


def test_growth_keeps_rows():
    s = RouteStore(num_layers=1, top_k=2, num_experts=16, initial_rows=2)
    for p in range(50):
        s.write("a", p, rows([p % 15]))
    ids, missing = s.take("a")
    assert missing is None and ids[:, 0, 0].tolist() == [p % 15 for p in range(50)]


def test_errors_leave_other_requests_intact():
    s = RouteStore(num_layers=1, top_k=2, num_experts=16)
    s.write("a", 0, rows([1, 2]))
    with pytest.raises(StoreError, match="unknown request 'b'"):
        s.take("b")
    with pytest.raises(StoreError, match=r"expected rows of shape \[T, L=1, K=2\], got \(1, 1, 3\)"):
        s.write("a", 2, np.zeros((1, 1, 3), np.uint8))
    with pytest.raises(StoreError, match="expected dtype uint8, got int64"):
        s.write("a", 2, np.zeros((1, 1, 2), np.int64))
    with pytest.raises(StoreError, match="expected start >= 0"):
        s.write("a", -1, rows([1]))
    ids, missing = s.take("a")
    assert missing is None and ids[:, 0, 0].tolist() == [1, 2]


def test_truncate_and_free():
    s = RouteStore(num_layers=1, top_k=2, num_experts=16)
    s.write("a", 0, rows([1, 2, 3]))
    s.truncate("a", 1)
    assert s.length("a") == 1
    s.free("a")
    assert "a" not in s and len(s) == 0
