"""The host half of a capture step: pinned host slots, the asynchronous copy out of the device
buffers, and the hand-off of finished steps to the sink, in step order.

Shape legend: n rows this rank keeps, L MoE layers, K top-k, E experts.

:class:`~routecap.capturer.StepCapturer` owns the device buffers and the step; once a step's
device work is queued it calls :meth:`HostHandoff.copy_out`, and this module owns everything
after that: which pinned slot the step travels in, when the copy is complete, and how the cell
states become a :class:`StepSnapshot`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .trace import id_dtype_for

__all__ = ["HostHandoff", "StepSnapshot"]


@dataclass(frozen=True, kw_only=True)
class StepSnapshot:
    """One finished step on the host. The arrays are valid only during the sink call."""

    step: int
    expert_ids_NLK: np.ndarray  # trace dtype (uint8 / uint16), this rank's rows
    valid_NL: np.ndarray  # bool: the layer wrote this row in this step, ids in range
    tag: Any


@dataclass(frozen=True, kw_only=True)
class _Pending:
    step: int
    num_tokens: int
    valid_rows: int  # rows past this (a graph replayed at a smaller size) read as missing
    tag: Any
    slot: int
    event: Any  # torch.cuda.Event


class HostHandoff:
    """Finished steps on their way from the device buffers to ``sink``.

    On CUDA a step is copied into one of ``slots`` pinned host buffers (a non-blocking copy and an
    event): :meth:`consume` hands over the steps whose copy has completed, oldest first, and waits
    for them only when asked to. When every slot is in flight, :meth:`copy_out` first waits for the
    oldest (backpressure). On the CPU a step is handed over at once, without a copy.

    A cell's state (0: not written this step, 1: valid, 2: written with ids outside ``[0, E)``)
    becomes the snapshot's ``valid_NL``; cells out of range are reported as
    ``reject("range", message)`` (which raises in strict mode).
    """

    def __init__(self, *, num_experts: int, sink: Callable[[StepSnapshot], None],
                 reject: Callable[[str, str], None], slots: int, cuda: bool) -> None:
        self.num_experts = num_experts
        self.sink = sink
        self._reject = reject
        self._cuda = cuda
        self._host_dtype = id_dtype_for(num_experts)
        self._num_slots = max(1, slots)
        self._pending: deque[_Pending] = deque()
        self._free_slots: deque[int] = deque(range(self._num_slots))
        self._host_ids: list[torch.Tensor] = []
        self._host_state: list[torch.Tensor] = []

    def allocate(self, ids_NLK: torch.Tensor, state_NL: torch.Tensor) -> None:
        """Pinned host slots shaped like the device buffers (called with nothing in flight)."""
        if self._pending:
            raise AssertionError(f"allocate() with {len(self._pending)} steps in flight")
        if self._cuda:
            self._host_ids = [torch.empty(ids_NLK.shape, dtype=ids_NLK.dtype, pin_memory=True)
                              for _ in range(self._num_slots)]
            self._host_state = [torch.empty(state_NL.shape, dtype=torch.uint8, pin_memory=True)
                                for _ in range(self._num_slots)]

    def copy_out(self, step_no: int, ids_NLK: torch.Tensor, state_NL: torch.Tensor, n: int,
                 valid_rows: int, tag: Any) -> None:
        """Start the copy of the first ``n`` rows of a step (rows past ``valid_rows`` read as
        missing); no host sync unless every slot is in flight."""
        if not self._cuda:
            self._deliver(step_no, tag, ids_NLK[:n].numpy(), state_NL[:n].numpy(), valid_rows)
            return
        if not self._free_slots:
            # NOTE: backpressure: every pinned slot is in flight, so wait for the oldest copy.
            self.consume(block=True, limit=1)
        slot = self._free_slots.popleft()
        self._host_ids[slot][:n].copy_(ids_NLK[:n], non_blocking=True)
        self._host_state[slot][:n].copy_(state_NL[:n], non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append(_Pending(step=step_no, num_tokens=n, valid_rows=valid_rows, tag=tag,
                                      slot=slot, event=event))

    def consume(self, *, block: bool, limit: int | None = None) -> int:
        """Hand the finished steps to the sink, oldest first: those whose copy is complete, or
        (``block``) all of them, waiting. Returns how many."""
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
                self._deliver(p.step, p.tag, ids, state, p.valid_rows)
            finally:
                self._free_slots.append(p.slot)
            done += 1
        return done

    def _deliver(self, step: int, tag: Any, ids: np.ndarray, state: np.ndarray,
                 valid_rows: int) -> None:
        if ids.dtype != self._host_dtype:
            if ids.dtype.itemsize == self._host_dtype.itemsize:
                ids = ids.view(self._host_dtype)
            else:
                ids = ids.astype(self._host_dtype)
        valid = state == 1
        bad = state == 2
        # rows past what the step (or the replayed graph) wrote hold another step's cells
        valid[valid_rows:] = False
        bad[valid_rows:] = False
        if bad.any():
            row, layer = (int(v) for v in np.argwhere(bad)[0])
            self._reject("range", (
                f"step {step}: layer {layer} gave expert ids outside [0, {self.num_experts}) "
                f"(first at row {row}); {int(bad.sum())} (row, layer) cells affected"))
        self.sink(StepSnapshot(step=step, expert_ids_NLK=ids, valid_NL=valid, tag=tag))
