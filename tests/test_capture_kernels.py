import pytest
import torch

from routecap.capture_kernels import finish_cells, finish_reference, fused_available


def _case(N=5, L=3, K=4, E=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, E, (N, L, K), generator=g)
    ids[1, 2, 3] = E          # one past the end
    ids[3, 0, 0] = -1         # a sentinel some engines use
    ids[4, 1, 2] = 2**40 + 2  # would wrap into range if narrowed first
    return ids, E


def test_reference_marks_out_of_range_cells_and_narrows():
    ids, E = _case()
    narrow = torch.zeros(ids.shape, dtype=torch.uint8)
    state = torch.zeros(ids.shape[:2], dtype=torch.uint8)
    finish_reference(ids, narrow, state, E)
    expected = torch.ones(ids.shape[:2], dtype=torch.uint8)
    expected[1, 2] = expected[3, 0] = expected[4, 1] = 2
    assert torch.equal(state, expected)
    ok = state == 1
    assert torch.equal(narrow[ok].long(), ids[ok])


def test_zero_rows_is_a_no_op():
    empty = torch.zeros(0, 2, 2, dtype=torch.int64)
    finish_cells(empty, empty.to(torch.uint8), torch.zeros(0, 2, dtype=torch.uint8), 8, fused=False)


@pytest.mark.skipif(not fused_available(torch.device("cuda")), reason="needs CUDA with Triton")
@pytest.mark.parametrize("dtype,E", [(torch.uint8, 16), (torch.uint8, 256), (torch.int16, 300),
                                     (torch.int32, 65536)])
@pytest.mark.parametrize("N,L,K", [(1, 1, 1), (5, 3, 4), (1000, 48, 8), (3, 7, 6)])
def test_fused_kernel_equals_reference(dtype, E, N, L, K):
    ids, _ = _case(N=max(N, 5), L=max(L, 3), K=max(K, 4), E=E)
    ids = ids[:N, :L, :K].contiguous().cuda()
    out = {}
    for fused in (False, True):
        cap_N = N + 3  # views of the first N rows of bigger buffers, as in the capturer
        narrow = torch.full((cap_N, L, K), 7, dtype=dtype, device="cuda")
        state = torch.full((cap_N, L), 9, dtype=torch.uint8, device="cuda")
        finish_cells(ids, narrow[:N], state[:N], E, fused=fused)
        out[fused] = (narrow.cpu(), state.cpu())
    ok = out[False][1][:N] == 1
    assert torch.equal(out[True][1], out[False][1])  # rows past N untouched by both
    assert torch.equal(out[True][0][:N][ok], out[False][0][:N][ok])
    assert torch.equal(out[True][0][N:], out[False][0][N:])
