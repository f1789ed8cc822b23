"""The device step buffer: capture top-k ids during a forward, hand them to the host after it.

Shape legend: N rows the router saw, n rows this rank keeps (its tokens), L MoE layers, K top-k,
E experts, TP tensor-parallel size.

One *step* is one forward of the model. Between :meth:`StepCapturer.begin_step` and
:meth:`StepCapturer.end_step` every MoE layer calls :meth:`StepCapturer.capture` with the ids its
router chose. The step's :class:`~routecap.layout.RankView` and layout say which of the router's N
rows are this rank's (:mod:`routecap.layout`); those rows land in a static device buffer
``[max_tokens, L, K]`` (a copy kernel per contiguous segment, no allocation, no host sync: safe
inside a CUDA graph). ``end_step`` narrows the step's rows to the trace dtype, marks which
``(row, layer)`` cells are valid, all-gathers them over TP when the layout shards rows across TP
ranks, and copies them into pinned host memory asynchronously (:mod:`routecap.capture_host`). The
host side (a *sink*, normally the binding feeding a :class:`routecap.store.RouteStore`) receives
each step only once its copy is complete: :meth:`StepCapturer.poll` never waits,
:meth:`StepCapturer.drain` does.

A cell is valid only if its layer wrote that row in *this* step with ids in ``[0, E)``. Rows a layer
did not write (it was skipped, or its rows fit no layout) are never returned from an earlier step:
the per-layer row counter is reset at every ``begin_step``.

CUDA graphs: capture a step with :meth:`StepCapturer.graph_step` inside ``torch.cuda.graph``; after
every replay call :meth:`StepCapturer.publish` with the real token count (the graph ran at a padded
size; only the first rows are real).

Strict mode (default) raises :class:`CaptureError` on bad input; lenient mode marks the affected
cells missing, counts the event in :attr:`StepCapturer.events` and warns once per kind.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from . import distributed as rcdist
from .capture_host import HostHandoff, StepSnapshot
from .capture_kernels import finish_cells, fused_available
from .layout import Layout, LayoutError, RankView, RowPlan, infer_layout, plan_rows
from .trace import id_dtype_for

__all__ = ["CaptureError", "CaptureSpec", "StepCapturer", "StepSnapshot", "copy_segments"]


def copy_segments(dst_NK: Any, src_NK: Any, segments: tuple[tuple[int, int], ...]) -> int:
    """Copy the ``(start, length)`` slices of ``src_NK`` one after another into ``dst_NK``'s rows.

    The one place where a plan's segments (:func:`routecap.layout.plan_rows`) become copies: a
    device copy per non-empty segment, no host sync. Returns the rows written.

    Example:
        >>> dst = torch.zeros(3, 1, dtype=torch.long)
        >>> copy_segments(dst, torch.arange(6).view(6, 1), ((1, 2), (4, 1)))
        3
        >>> dst.view(-1).tolist()
        [1, 2, 4]
    """
    d = 0
    for start, length in segments:
        if length:
            dst_NK[d:d + length] = src_NK[start:start + length]
        d += length
    return d


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


@dataclass
class _Step:
    """Host-side state of the open step."""

    num_tokens: int  # n: rows this rank keeps
    tag: Any
    view: RankView | None
    layout: Layout | None
    publish: bool
    plans: dict[int, RowPlan]  # by N, so each size is resolved once per step
    gather: RowPlan | None  # the TP-gather plan, decided at begin_step from the declared layout
    rows: int  # rows every successful capture writes: n, or this TP rank's chunk under a gather
    written_L: list[bool]  # host-side: which layers wrote this step (the rest read as missing)


def _check_input(spec: CaptureSpec, layer: Any, ids: Any) -> tuple[str, str] | None:
    """What is wrong with ``capture(layer, ids)``, as (kind, message); None if nothing."""
    # NOTE: every check reads host-side metadata (shape, dtype) only: no sync.
    L, K = spec.num_layers, spec.top_k
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
    return None


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
        sink: called as ``sink(snapshot)`` for every finished, published step, in step order.
        strict: raise on bad input (default) or mark it missing and count it.
        host_slots: pinned host buffers in flight before ``end_step`` waits for the oldest.
        growable: let an eager step larger than ``max_tokens`` reallocate the buffer (never
            inside a CUDA graph, where the buffer must stay put).
        tp_group: process group of this rank's TP peers, for layouts that shard rows over TP.

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
        tp_group: Any = None,
    ) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.strict = strict
        self.growable = growable
        self.tp_group = tp_group
        self.events: Counter[str] = Counter()
        self._warned: set[str] = set()
        self._narrow = _device_narrow_dtype(spec.num_experts)
        self._cuda = self.device.type == "cuda"
        self._fused = fused_available(self.device)
        self._graph_rows = 0  # rows the captured graph's step holds
        self._host = HostHandoff(num_experts=spec.num_experts, sink=sink, reject=self._reject,
                                 slots=host_slots, cuda=self._cuda)
        self._step_no = 0
        self._step: _Step | None = None
        self._graph_steps = 0  # graph_step() contexts open (no growth, no publish inside)
        self._graphed = False  # a graph was captured: the buffers must never move again
        self._graph_publish = True
        self._allocate(spec.max_tokens)

    # ---- buffers --------------------------------------------------------------------------------
    def _allocate(self, capacity: int) -> None:
        L, K = self.spec.num_layers, self.spec.top_k
        dev = self.device
        self.capacity = capacity
        # int64, as routers return: any id, however large, is range-checked before narrowing
        self._ids_NLK = torch.zeros(capacity, L, K, dtype=torch.int64, device=dev)
        self._narrow_NLK = torch.zeros(capacity, L, K, dtype=self._narrow, device=dev)
        # Cell state of the step: 0 not written this step, 1 valid, 2 written with ids out of range.
        self._state_NL = torch.zeros(capacity, L, dtype=torch.uint8, device=dev)
        if self._fused:
            # NOTE: compile the kernel now, never while a CUDA graph is being captured
            finish_cells(self._ids_NLK[:1], self._narrow_NLK[:1], self._state_NL[:1],
                         self.spec.num_experts, fused=True)
        self._host.allocate(self._narrow_NLK, self._state_NL)

    def _grow(self, n: int) -> None:
        if not self.growable or self._graph_steps or self._graphed:
            why = ("a CUDA graph records the buffer's address" if self._graphed or
                   self._graph_steps else "growable=False")
            raise CaptureError(
                f"step of {n} tokens exceeds the capture buffer of {self.capacity} rows and the "
                f"buffer cannot grow ({why}); raise CaptureSpec.max_tokens"
            )
        # NOTE: in-flight copies read from the old buffers; wait for them before reallocating.
        self.drain()
        self._allocate(max(n, 2 * self.capacity))

    # ---- hot path ---------------------------------------------------------------------------------
    @property
    def in_step(self) -> bool:
        return self._step is not None

    @property
    def step_tokens(self) -> int | None:
        """Rows this rank keeps in the open step (``None`` outside a step)."""
        return None if self._step is None else self._step.num_tokens

    def begin_step(self, num_tokens: int, tag: Any = None, *, view: RankView | None = None,
                   layout: Layout | str | None = None) -> None:
        """Open a step in which this rank keeps ``num_tokens`` rows.

        ``view`` (with ``layout``, or inferred from the router's row count when None) says which
        of the router's rows those are; without a view the router must see exactly
        ``num_tokens`` rows (the local layout of a single process). ``tag`` travels with the
        step's snapshot to the sink.
        """
        if self._step is not None:
            raise CaptureError(f"begin_step({num_tokens}) while step {self._step_no} is still open")
        if num_tokens < 0:
            raise CaptureError(f"begin_step: expected num_tokens >= 0, got {num_tokens}")
        if view is not None and view.my_tokens != num_tokens:
            raise CaptureError(f"begin_step: num_tokens={num_tokens} but the view gives this rank "
                               f"{view.my_tokens} tokens ({view.describe()})")
        rows_needed = num_tokens
        if view is not None and view.tp_size > 1:
            rows_needed = max(rows_needed, view.tp_size * max(view.shard_size or 0, view.max_chunk))
        if rows_needed > self.capacity:
            self._grow(rows_needed)
        lay = None if layout is None else Layout(layout)
        gather = None
        rows = num_tokens
        if lay is Layout.TP_SHARDED and view is not None and view.tp_size > 1:
            # NOTE: whether the step all-gathers over TP is decided here, from the declared layout,
            # never from which captures succeeded: every TP rank must join the collective, even one
            # whose layers were all rejected (it contributes cells marked unwritten)
            gather = plan_rows(lay, view, view.chunk(view.dp_rank, view.tp_rank))
            rows = gather.segments[0][1]
        self._step = _Step(num_tokens=num_tokens, tag=tag, view=view, layout=lay,
                           publish=view is None or view.tp_rank == 0, plans={}, gather=gather,
                           rows=rows, written_L=[False] * self.spec.num_layers)

    def _plan(self, step: _Step, num_rows: int) -> RowPlan:
        plan = step.plans.get(num_rows)
        if plan is None:
            if step.view is None:
                view = RankView(tokens_per_dp=(step.num_tokens,))
                plan = plan_rows(Layout.LOCAL, view, num_rows)
            elif step.layout is None:
                plan = infer_layout(step.view, num_rows)
            else:
                plan = plan_rows(step.layout, step.view, num_rows)
            step.plans[num_rows] = plan
        return plan

    def capture(self, layer: int, topk_ids_NK: torch.Tensor) -> None:
        """Record the ids one MoE layer chose for the router's rows of the open step."""
        step = self._step
        if step is None:
            return  # a forward outside any step (e.g. a warm-up the binding does not track)
        problem = _check_input(self.spec, layer, topk_ids_NK)
        if problem is not None:
            self._reject(*problem)
            return
        try:
            plan = self._plan(step, int(topk_ids_NK.shape[0]))
        except LayoutError as e:
            self._reject("rows", f"capture(layer {layer}): {e}")
            return
        if plan.tp_gather != (step.gather is not None) or (
                plan.tp_gather and plan.tp_chunks != step.gather.tp_chunks):
            self._reject("rows", f"capture(layer {layer}): the router's {plan.num_rows} rows fit "
                         f"{plan.layout.value}, which "
                         + ("shards rows over TP, but the step did not declare layout="
                            "'tp_sharded' at begin_step (every TP rank must agree on the "
                            "all-gather before the forward)" if plan.tp_gather else
                            "does not shard rows over TP, but the step declared 'tp_sharded'"))
            return
        dst = copy_segments(self._ids_NLK[:, layer], topk_ids_NK, plan.segments)
        if dst != step.rows:  # a plan keeps this rank's rows: n, or its TP chunk
            raise AssertionError(f"plan {plan} wrote {dst} rows, the step expects {step.rows}")
        step.written_L[layer] = True

    def _reject(self, kind: str, message: str) -> None:
        if self.strict:
            raise CaptureError(message)
        self.events[kind] += 1
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(
                f"routecap (lenient): {message}; the affected rows of this step are marked missing "
                "(warned once per kind; see StepCapturer.events for counts)",
                RuntimeWarning,
                stacklevel=3,
            )

    def _finish_device(self, step: _Step) -> int:
        """Device half of end_step: narrow, cell states, TP gather. No host sync.

        One fused kernel (CUDA with Triton) for every written cell, plus a clear of the cells of
        each layer that wrote nothing (rare), plus the gather collectives of a TP-sharded step.
        Returns the rows the step holds afterwards.
        """
        rows = step.rows
        finish_cells(self._ids_NLK[:rows], self._narrow_NLK[:rows], self._state_NL[:rows],
                     self.spec.num_experts, fused=self._fused)
        for layer, written in enumerate(step.written_L):
            if not written and rows:
                self._state_NL[:rows, layer].zero_()
        if step.gather is not None:
            plan = step.gather
            S = plan.gather_rows
            # every TP rank contributes S rows (its chunk, then whatever is below it: trimmed);
            # the trimmed rows go back into the same static buffers, so eager steps and every
            # graph publish from one place
            ids_all = rcdist.all_gather_equal(self._narrow_NLK[:S], self.tp_group)
            state_all = rcdist.all_gather_equal(self._state_NL[:S], self.tp_group)
            dst = 0
            for t, chunk in enumerate(plan.tp_chunks):
                if chunk:
                    self._narrow_NLK[dst:dst + chunk].copy_(ids_all[t * S:t * S + chunk])
                    self._state_NL[dst:dst + chunk].copy_(state_all[t * S:t * S + chunk])
                dst += chunk
            rows = dst
        return rows

    def end_step(self) -> None:
        """Close the step: narrow, mark valid cells and start the copy to the host (no sync)."""
        step = self._step
        if step is None:
            raise CaptureError("end_step() without begin_step()")
        self._step = None
        try:
            self._finish_device(step)
        finally:
            step_no, self._step_no = self._step_no, self._step_no + 1
        if step.publish:
            self._copy_out(step_no, step.num_tokens, step.num_tokens, step.tag)

    def abort_step(self) -> None:
        """Drop the open step (the forward failed); nothing of it reaches the sink."""
        self._step = None

    # ---- CUDA graphs ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def graph_step(self, num_tokens: int, *, view: RankView | None = None,
                   layout: Layout | str | None = None) -> Iterator[None]:
        """A step whose device work is recorded into a CUDA graph, at the graph's (padded) size.

        Use inside ``torch.cuda.graph(g)`` around the model's forward; nothing is published at
        capture time. After every ``g.replay()``, call :meth:`publish` with the real row count.
        """
        self._graph_steps += 1
        try:
            self.begin_step(num_tokens, view=view, layout=layout)
            try:
                yield
            except BaseException:
                self.abort_step()
                raise
            step = self._step
            self._step = None
            if step is None:
                raise CaptureError("graph_step: the step was closed inside the graph")
            self._graph_rows = self._finish_device(step)
            self._graph_publish = step.publish
            self._graphed = True
        finally:
            self._graph_steps -= 1

    def publish(self, num_tokens: int, tag: Any = None) -> None:
        """After a graph replay: hand the first ``num_tokens`` rows of the replayed step to the host.

        Rows past the replayed graph's own size come out missing (the graph clears their state).
        """
        if not self._graphed:
            raise CaptureError("publish() without a captured graph_step(); use end_step()")
        if not isinstance(num_tokens, int) or not 0 <= num_tokens <= self.capacity:
            raise CaptureError(f"publish: expected 0 <= num_tokens <= {self.capacity}, got "
                               f"{num_tokens!r}")
        step_no, self._step_no = self._step_no, self._step_no + 1
        if self._graph_publish:
            self._copy_out(step_no, num_tokens, min(num_tokens, self._graph_rows), tag)

    # ---- host side: HostHandoff ----------------------------------------------------------------
    @property
    def sink(self) -> Callable[[StepSnapshot], None]:
        return self._host.sink

    def _copy_out(self, step_no: int, n: int, valid_rows: int, tag: Any) -> None:
        self._host.copy_out(step_no, self._narrow_NLK, self._state_NL, n, valid_rows, tag)

    def poll(self) -> int:
        """Hand every step whose copy has finished to the sink, without waiting. Returns how many."""
        return self._host.consume(block=False)

    def drain(self) -> int:
        """Wait for every step in flight and hand it to the sink.

        NOTE: this synchronises with the device (one event wait per step in flight); call it at
        the end of a batch, not inside a step.
        """
        return self._host.consume(block=True)
