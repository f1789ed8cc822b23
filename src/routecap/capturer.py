"""The device step buffer: capture top-k ids during a forward, hand them to the host after it.

Shape legend: N rows of the step (tokens the model ran this step), L MoE layers, K top-k,
E experts.

One *step* is one forward of the model over N tokens. Between :meth:`StepCapturer.begin_step` and
:meth:`StepCapturer.end_step` every MoE layer calls :meth:`StepCapturer.capture` with the ids its
router chose; the ids land in a static device buffer ``[max_tokens, L, K]`` (one copy kernel per
layer, no allocation, no host sync: safe inside a CUDA graph). ``end_step`` narrows the step's
rows to the trace dtype, marks which ``(row, layer)`` cells are valid, and copies both into pinned
host memory asynchronously. The host side (a sink, normally :class:`routecap.store.RouteStore`)
receives each step only once its copy is complete: :meth:`StepCapturer.poll` never waits,
:meth:`StepCapturer.drain` does (the one deliberate sync, at the end of a batch).

A cell is valid only if its layer wrote that row in *this* step with ids in ``[0, E)``. Rows a layer
did not write (it was skipped, or it saw the wrong number of rows) are never returned from an
earlier step: the per-layer row counter is reset at every ``begin_step``.

Strict mode (default) raises :class:`CaptureError` on bad input; lenient mode marks the affected
cells missing, counts the event in :attr:`StepCapturer.events` and warns once per kind.
"""

from __future__ import annotations

import warnings
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .trace import id_dtype_for

__all__ = ["CaptureError", "CaptureSpec", "StepCapturer", "StepSnapshot"]


class CaptureError(RuntimeError):
    """Capture saw input that breaks what it was configured for (strict mode)."""


@dataclass(frozen=True, kw_only=True)
class CaptureSpec:
    """What one capturer records: L layers of top-K ids over E experts, at most ``max_tokens`` rows."""

    num_layers: int
    top_k: int
    num_experts: int
    max_tokens: int = 4096

    def __post_init__(self) -> None:
        for name in ("num_layers", "top_k", "num_experts", "max_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"CaptureSpec.{name}: expected a positive int, got {v!r}")
        if self.top_k > self.num_experts:
            raise ValueError(
                f"CaptureSpec.top_k: expected <= num_experts={self.num_experts}, got {self.top_k}"
            )
        id_dtype_for(self.num_experts)  # raises for E > 65536


@dataclass(frozen=True, kw_only=True)
class StepSnapshot:
    """One finished step on the host. The arrays are valid only during the sink call."""

    step: int
    expert_ids_NLK: np.ndarray  # trace dtype (uint8 / uint16)
    valid_NL: np.ndarray  # bool: the layer wrote this row in this step, ids in range
    tag: Any


@dataclass
class _Pending:
    step: int
    num_tokens: int
    tag: Any
    slot: int
    event: Any  # torch.cuda.Event | None


def _device_narrow_dtype(num_experts: int) -> torch.dtype:
    # NOTE: uint8 covers E <= 256; int16 holds the same bits as uint16 for ids < 32768; above that
    # the step travels as int32 and is narrowed to uint16 on the host.
    if num_experts <= 256:
        return torch.uint8
    if num_experts <= 1 << 15:
        return torch.int16
    return torch.int32


class StepCapturer:
    """Static device buffer plus asynchronous hand-off of finished steps to a host sink.

    Args:
        spec: sizes (L, K, E, max_tokens).
        device: where the model runs.
        sink: called as ``sink(snapshot)`` for every finished step, in step order.
        strict: raise on bad input (default) or mark it missing and count it.
        host_slots: pinned host buffers in flight before ``end_step`` waits for the oldest.
        growable: let an eager step larger than ``max_tokens`` reallocate the buffer (never
            inside a CUDA graph, where the buffer must stay put).

    Example:
        >>> cap = StepCapturer(CaptureSpec(num_layers=2, top_k=2, num_experts=8), device="cpu",
        ...                    sink=lambda s: print(s.step, s.expert_ids_NLK.shape))
        >>> cap.begin_step(3)
        >>> for layer in range(2):
        ...     cap.capture(layer, torch.tensor([[1, 2], [3, 4], [5, 6]]))
        >>> cap.end_step(); n = cap.drain()
        0 (3, 2, 2)
    """

    def __init__(
        self,
        spec: CaptureSpec,
        *,
        device: torch.device | str,
        sink: Callable[[StepSnapshot], None],
        strict: bool = True,
        host_slots: int = 4,
        growable: bool = True,
    ) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.sink = sink
        self.strict = strict
        self.growable = growable
        self.events: Counter[str] = Counter()
        self._warned: set[str] = set()
        self._host_dtype = id_dtype_for(spec.num_experts)
        self._narrow = _device_narrow_dtype(spec.num_experts)
        self._cuda = self.device.type == "cuda"
        self._num_slots = max(1, host_slots)
        self._pending: deque[_Pending] = deque()
        self._free_slots: deque[int] = deque(range(self._num_slots))
        self._step = 0
        self._n: int | None = None  # rows of the open step, None outside a step
        self._tag: Any = None
        self._allocate(spec.max_tokens)

    # ---- buffers --------------------------------------------------------------------------------
    def _allocate(self, capacity: int) -> None:
        L, K = self.spec.num_layers, self.spec.top_k
        dev = self.device
        self.capacity = capacity
        self._ids_NLK = torch.zeros(capacity, L, K, dtype=torch.int32, device=dev)
        self._rows_L = torch.zeros(L, dtype=torch.int32, device=dev)
        self._row_index_N = torch.arange(capacity, dtype=torch.int32, device=dev)
        self._narrow_NLK = torch.zeros(capacity, L, K, dtype=self._narrow, device=dev)
        # Cell state of the step: 0 not written this step, 1 valid, 2 written with ids out of range.
        self._state_NL = torch.zeros(capacity, L, dtype=torch.uint8, device=dev)
        if self._cuda:
            self._host_ids = [
                torch.empty(capacity, L, K, dtype=self._narrow, pin_memory=True)
                for _ in range(self._num_slots)
            ]
            self._host_state = [
                torch.empty(capacity, L, dtype=torch.uint8, pin_memory=True)
                for _ in range(self._num_slots)
            ]

    def _grow(self, n: int) -> None:
        if not self.growable:
            raise CaptureError(
                f"step of {n} tokens exceeds the capture buffer of {self.capacity} rows and the "
                "buffer cannot grow (CUDA-graph mode); raise CaptureSpec.max_tokens"
            )
        # NOTE: in-flight copies read from the old buffers; wait for them before reallocating.
        self.drain()
        self._allocate(max(n, 2 * self.capacity))

    # ---- hot path ---------------------------------------------------------------------------------
    @property
    def in_step(self) -> bool:
        return self._n is not None

    @property
    def step_tokens(self) -> int | None:
        """Rows of the open step (``None`` outside a step)."""
        return self._n

    def begin_step(self, num_tokens: int, tag: Any = None) -> None:
        """Open a step of ``num_tokens`` rows; ``tag`` travels with its snapshot to the sink."""
        if self._n is not None:
            raise CaptureError(f"begin_step({num_tokens}) while step {self._step} is still open")
        if num_tokens < 0:
            raise CaptureError(f"begin_step: expected num_tokens >= 0, got {num_tokens}")
        if num_tokens > self.capacity:
            self._grow(num_tokens)
        self._n = num_tokens
        self._tag = tag
        self._rows_L.zero_()

    def capture(self, layer: int, topk_ids_NK: torch.Tensor) -> None:
        """Record the ids one MoE layer chose for the rows of the open step.

        ``topk_ids_NK`` must hold exactly the step's rows, in step order (parallel layouts are
        resolved before this call, see :mod:`routecap.layout`).
        """
        n = self._n
        if n is None:
            return  # a forward outside any step (e.g. a warm-up the binding does not track)
        problem = self._check(layer, topk_ids_NK, n)
        if problem is not None:
            self._reject(problem[0], problem[1])
            return
        if n:
            self._ids_NLK[:n, layer].copy_(topk_ids_NK, non_blocking=True)
        self._rows_L[layer].fill_(n)

    def _check(self, layer: Any, ids: Any, n: int) -> tuple[str, str] | None:
        # NOTE: every check reads host-side metadata (shape, dtype, device) only: no sync.
        L, K = self.spec.num_layers, self.spec.top_k
        if not isinstance(layer, int) or not 0 <= layer < L:
            return "layer", f"capture: expected layer in [0, {L}), got {layer!r}"
        if not isinstance(ids, torch.Tensor):
            return "type", f"capture(layer {layer}): expected a torch.Tensor, got {type(ids).__name__}"
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            return "dtype", (
                f"capture(layer {layer}): expected integer expert ids, got dtype {ids.dtype}"
            )
        if ids.dim() != 2 or ids.shape[1] != K:
            return "shape", (
                f"capture(layer {layer}): expected ids of shape [N, K={K}], got {tuple(ids.shape)}"
            )
        if ids.shape[0] != n:
            return "rows", (
                f"capture(layer {layer}): the step has {n} rows but the router gave "
                f"{ids.shape[0]}; the rows were not resolved to this rank's tokens"
            )
        if ids.device != self.device:
            return "device", (
                f"capture(layer {layer}): expected ids on {self.device}, got {ids.device}"
            )
        return None

    def _reject(self, kind: str, message: str) -> None:
        if self.strict:
            raise CaptureError(message)
        self.events[kind] += 1
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(
                f"routecap (lenient): {message}; the layer's rows of this step are marked missing "
                "(warned once per kind; see StepCapturer.events for counts)",
                RuntimeWarning,
                stacklevel=3,
            )

    def end_step(self) -> None:
        """Close the step: narrow, mark valid cells and start the copy to the host (no sync)."""
        n = self._n
        if n is None:
            raise CaptureError("end_step() without begin_step()")
        self._n = None
        step, self._step = self._step, self._step + 1
        E = self.spec.num_experts
        ids = self._ids_NLK[:n]
        written_NL = self._row_index_N[:n, None] < self._rows_L[None, :]
        bad_NL = ((ids < 0) | (ids >= E)).any(dim=-1)
        state = self._state_NL[:n]
        torch.add(written_NL.to(torch.uint8), bad_NL.to(torch.uint8), out=state)
        state.mul_(written_NL)
        self._narrow_NLK[:n].copy_(ids)
        if not self._cuda:
            self._deliver(step, n, self._tag, self._narrow_NLK[:n].numpy(), state.numpy())
            return
        if not self._free_slots:
            # NOTE: backpressure: every pinned slot is in flight, so wait for the oldest copy.
            self._consume(block=True, limit=1)
        slot = self._free_slots.popleft()
        self._host_ids[slot][:n].copy_(self._narrow_NLK[:n], non_blocking=True)
        self._host_state[slot][:n].copy_(state, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append(_Pending(step=step, num_tokens=n, tag=self._tag, slot=slot, event=event))
        self._tag = None

    def abort_step(self) -> None:
        """Drop the open step (the forward failed); nothing of it reaches the sink."""
        self._n = None
        self._tag = None

    # ---- host side --------------------------------------------------------------------------------
    def poll(self) -> int:
        """Hand every step whose copy has finished to the sink, without waiting. Returns how many."""
        return self._consume(block=False)

    def drain(self) -> int:
        """Wait for every step in flight and hand it to the sink.

        NOTE: this synchronises with the device (one event wait per step in flight); call it at
        the end of a batch, not inside a step.
        """
        return self._consume(block=True)

    def _consume(self, *, block: bool, limit: int | None = None) -> int:
        done = 0
        while self._pending and (limit is None or done < limit):
            p = self._pending[0]
            if not block and not p.event.query():
                break
            if block:
                p.event.synchronize()
            self._pending.popleft()
            try:
                ids = self._host_ids[p.slot][: p.num_tokens].numpy()
                state = self._host_state[p.slot][: p.num_tokens].numpy()
                self._deliver(p.step, p.num_tokens, p.tag, ids, state)
            finally:
                self._free_slots.append(p.slot)
            done += 1
        return done

    def _deliver(self, step: int, n: int, tag: Any, ids: np.ndarray, state: np.ndarray) -> None:
        if ids.dtype != self._host_dtype:
            if ids.dtype.itemsize == self._host_dtype.itemsize:
                ids = ids.view(self._host_dtype)
            else:
                ids = ids.astype(self._host_dtype)
        valid = state == 1
        bad = state == 2
        if bad.any():
            row, layer = (int(v) for v in np.argwhere(bad)[0])
            msg = (
                f"step {step}: layer {layer} gave expert ids outside [0, {self.spec.num_experts}) "
                f"(first at row {row}); {int(bad.sum())} (row, layer) cells affected"
            )
            self._reject("range", msg)
        self.sink(StepSnapshot(step=step, expert_ids_NLK=ids, valid_NL=valid, tag=tag))
