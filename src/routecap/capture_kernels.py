"""The device work of closing a captured step, fused: narrow the ids and mark every cell, one kernel.

Shape legend: N rows of the step, L MoE layers, K top-k, E experts.

:meth:`routecap.capturer.StepCapturer.end_step` turns the step's int64 ids ``[N, L, K]`` (as routers
return them) into the trace's narrow dtype and a cell state ``[N, L]`` (1: ids in ``[0, E)``, 2: some
id out of range). With plain torch ops that is seven kernels (two compares, an ``any``, two casts,
an add, the narrowing copy); on CUDA with Triton available it is the one kernel below, which reads
each id once. Layers that wrote nothing in the step are not this kernel's business: the capturer
knows them on the host and clears their cells itself (a rare path).

Both paths write exactly the same bytes; tests/gpu checks the kernel against :func:`finish_reference`.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

__all__ = ["finish_cells", "finish_reference", "fused_available"]


def finish_reference(ids_NLK: torch.Tensor, narrow_NLK: torch.Tensor, state_NL: torch.Tensor,
                     num_experts: int) -> None:
    """Plain torch ops: ``narrow = ids`` (cast), ``state = 2 if any id out of [0, E) else 1``."""
    bad_NL = ((ids_NLK < 0) | (ids_NLK >= num_experts)).any(dim=-1)
    torch.add(bad_NL.to(torch.uint8), 1, out=state_NL)
    narrow_NLK.copy_(ids_NLK)


@functools.lru_cache(maxsize=1)
def _triton_kernel() -> Any:
    try:
        import triton
        import triton.language as tl
    except ImportError:  # CPU builds of torch come without Triton
        return None

    @triton.jit
    def _finish(ids_ptr, narrow_ptr, state_ptr, n_cells, num_experts,
                K: tl.constexpr, BLOCK: tl.constexpr):
        cells = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = cells < n_cells
        bad = tl.zeros([BLOCK], dtype=tl.int1)
        for k in tl.static_range(K):
            v = tl.load(ids_ptr + cells * K + k, mask=inside, other=0)
            bad = bad | (v < 0) | (v >= num_experts)
            # NOTE: the store casts to the narrow buffer's dtype; an out-of-range id may wrap there,
            # which is why the cell is marked 2 (never returned as a route)
            tl.store(narrow_ptr + cells * K + k, v.to(narrow_ptr.dtype.element_ty), mask=inside)
        tl.store(state_ptr + cells, tl.where(bad, 2, 1).to(tl.uint8), mask=inside)

    return triton, _finish


def fused_available(device: torch.device) -> bool:
    """True where :func:`finish_cells` runs as one Triton kernel (CUDA with Triton installed).

    ``ROUTECAP_FUSED_CAPTURE=0`` turns it off (plain torch ops), for comparisons.
    """
    if os.environ.get("ROUTECAP_FUSED_CAPTURE", "1") == "0":
        return False
    return device.type == "cuda" and _triton_kernel() is not None


def finish_cells(ids_NLK: torch.Tensor, narrow_NLK: torch.Tensor, state_NL: torch.Tensor,
                 num_experts: int, *, fused: bool) -> None:
    """Narrow ``ids_NLK`` into ``narrow_NLK`` and write ``state_NL``; one kernel when ``fused``.

    All three are views of the first N rows of contiguous ``[capacity, L, K]`` / ``[capacity, L]``
    buffers. No host sync, no allocation: safe inside a CUDA graph.
    """
    N, L, K = ids_NLK.shape
    if N == 0:
        return
    if not fused:
        finish_reference(ids_NLK, narrow_NLK, state_NL, num_experts)
        return
    assert ids_NLK.is_contiguous() and narrow_NLK.is_contiguous() and state_NL.is_contiguous()
    assert narrow_NLK.shape == ids_NLK.shape and state_NL.shape == (N, L)
    triton, kernel = _triton_kernel()
    n_cells = N * L
    block = 256
    kernel[(triton.cdiv(n_cells, block),)](ids_NLK, narrow_NLK, state_NL, n_cells, num_experts,
                                           K=K, BLOCK=block)
