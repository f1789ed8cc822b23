"""Expert-parallel placement planned from captured load.

Shape legend: L MoE layers, E logical experts, P physical expert slots (P = E + R, R redundant
slots), G GPUs (the expert-parallel size), S = P / G slots per GPU.

A placement is ``physical_to_logical_LP``: for each layer, which logical expert each physical slot
holds. Slot ``p`` lives on GPU ``p // S`` -- the convention of SGLang's ``ExpertLocationMetadata``
and of vLLM's ``EplbState``, so the array is what both engines hold.

* :func:`contiguous_placement` is what the engines start with: slot ``p`` holds expert ``p % E``
  (GPU g holds experts ``[g*S, (g+1)*S)``; the R redundant slots repeat experts 0, 1, ...).
* :func:`balanced_placement` is planned from a load ``load_LE`` the way DeepSeek's EPLB does it
  without node grouping: the R extra slots go one by one to the expert with the highest load per
  replica (:func:`replicate`), then the P replicas, heaviest first, each go to the least loaded
  GPU that still has a free slot (:func:`pack_lpt`, longest processing time with S slots per GPU).
  A layer where that does not beat the contiguous placement keeps the contiguous one, so the plan
  is never worse than the default.

Load model: a replicated expert's tokens are split evenly over its replicas (as EPLB assumes); a
GPU's load is the sum of its slots' shares. ``max/mean per GPU`` is the busiest GPU's load over
the mean GPU load: 1.0 is perfectly balanced, and the step time of an expert-parallel MoE layer
grows with the busiest GPU.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Placement",
    "PlacementError",
    "PlacementPlan",
    "balanced_placement",
    "contiguous_placement",
    "pack_lpt",
    "plan_placement",
    "replicate",
    "write_placement",
]

PLACEMENT_FORMATS = ("sglang", "vllm", "routecap")


class PlacementError(ValueError):
    """Placement inputs that cannot work (sizes that do not divide, a bad map)."""


def _check_sizes(num_experts: int, ep_size: int, redundant: int) -> int:
    if num_experts < 1:
        raise PlacementError(f"num_experts: expected >= 1, got {num_experts}")
    if ep_size < 1:
        raise PlacementError(f"ep_size: expected >= 1, got {ep_size}")
    if redundant < 0:
        raise PlacementError(f"redundant: expected >= 0 redundant slots, got {redundant}")
    slots = num_experts + redundant
    if slots % ep_size:
        raise PlacementError(
            f"experts + redundant slots = {num_experts} + {redundant} = {slots} is not divisible "
            f"by the expert-parallel size {ep_size}; every GPU holds the same number of slots "
            f"(choose --redundant so that {num_experts} + R is a multiple of {ep_size})")
    if slots < ep_size:
        raise PlacementError(f"{slots} slots cannot fill {ep_size} GPUs (fewer slots than GPUs)")
    return slots // ep_size


@dataclass(frozen=True, kw_only=True)
class Placement:
    """Which logical expert each physical slot holds, per layer; slot p is on GPU p // S."""

    physical_to_logical_LP: np.ndarray
    num_experts: int
    ep_size: int

    def __post_init__(self) -> None:
        m = np.asarray(self.physical_to_logical_LP)
        if m.ndim != 2:
            raise PlacementError(f"physical_to_logical_LP: expected a 2-d [L, P] array, got shape "
                                 f"{m.shape}")
        L, P = m.shape
        _check_sizes(self.num_experts, self.ep_size, P - self.num_experts)
        if m.size and (m.min() < 0 or m.max() >= self.num_experts):
            raise PlacementError(f"physical_to_logical_LP: expected ids in [0, {self.num_experts}), "
                                 f"got values in [{m.min()}, {m.max()}]")
        placed_LE = self._replicas(m)
        if (placed_LE == 0).any():
            layer, expert = (int(v) for v in np.argwhere(placed_LE == 0)[0])
            raise PlacementError(f"physical_to_logical_LP: expert {expert} of layer {layer} has no "
                                 "slot; every expert must be placed at least once")
        object.__setattr__(self, "physical_to_logical_LP", m.astype(np.int64, copy=False))

    def _replicas(self, m: np.ndarray) -> np.ndarray:
        L = m.shape[0]
        flat = m + (np.arange(L) * self.num_experts)[:, None]
        return np.bincount(flat.ravel(), minlength=L * self.num_experts).reshape(L, self.num_experts)

    @property
    def num_layers(self) -> int:
        return int(self.physical_to_logical_LP.shape[0])

    @property
    def num_slots(self) -> int:
        """P, physical slots per layer."""
        return int(self.physical_to_logical_LP.shape[1])

    @property
    def slots_per_gpu(self) -> int:
        return self.num_slots // self.ep_size

    @property
    def num_redundant(self) -> int:
        return self.num_slots - self.num_experts

    @property
    def replicas_LE(self) -> np.ndarray:
        """How many slots hold each logical expert."""
        return self._replicas(self.physical_to_logical_LP)

    def experts_on_gpu(self, layer: int, gpu: int) -> list[int]:
        S = self.slots_per_gpu
        return [int(e) for e in self.physical_to_logical_LP[layer, gpu * S:(gpu + 1) * S]]

    def logical_to_physical_LEX(self) -> np.ndarray:
        """``[L, E, R + 1]``: the slots of each expert, ascending, padded with -1 (vLLM's layout)."""
        L, E = self.num_layers, self.num_experts
        out = np.full((L, E, self.num_redundant + 1), -1, np.int64)
        fill = np.zeros((L, E), np.int64)
        for layer in range(L):
            for p, e in enumerate(self.physical_to_logical_LP[layer]):
                out[layer, e, fill[layer, e]] = p
                fill[layer, e] += 1
        return out

    def gpu_load_LG(self, load_LE: np.ndarray) -> np.ndarray:
        """Per-GPU load when each expert's load is split evenly over its replicas."""
        load_LE = _check_load(load_LE, self.num_layers, self.num_experts)
        share_LE = load_LE / self.replicas_LE
        slot_LP = np.take_along_axis(share_LE, self.physical_to_logical_LP, axis=1)
        return slot_LP.reshape(self.num_layers, self.ep_size, self.slots_per_gpu).sum(axis=2)


def _check_load(load_LE: Any, num_layers: int | None, num_experts: int | None) -> np.ndarray:
    a = np.asarray(load_LE, dtype=np.float64)
    if a.ndim != 2:
        raise PlacementError(f"load_LE: expected a 2-d [layers, experts] array, got shape {a.shape}")
    if num_layers is not None and a.shape != (num_layers, num_experts):
        raise PlacementError(f"load_LE: expected shape {(num_layers, num_experts)} (layers, "
                             f"experts of the placement), got {a.shape}")
    if not np.isfinite(a).all() or (a < 0).any():
        raise PlacementError("load_LE: expected finite loads >= 0")
    return a


def max_over_mean(gpu_load_LG: np.ndarray) -> np.ndarray:
    """Busiest GPU over the mean GPU, per layer (NaN for a layer with no load)."""
    mean = gpu_load_LG.mean(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, gpu_load_LG.max(axis=1) / np.where(mean > 0, mean, 1), np.nan)


def contiguous_placement(num_experts: int, ep_size: int, *, num_layers: int,
                         redundant: int = 0) -> Placement:
    """The engines' default: slot p holds expert p % E (SGLang's "trivial", vLLM's initial map)."""
    P = _check_sizes(num_experts, ep_size, redundant) * ep_size
    row = np.arange(P) % num_experts
    return Placement(physical_to_logical_LP=np.tile(row, (num_layers, 1)),
                     num_experts=num_experts, ep_size=ep_size)


def replicate(load_E: np.ndarray, num_slots: int) -> np.ndarray:
    """Replicas per expert: one each, then every extra slot to the highest load per replica.

    Example:
        >>> replicate(np.array([30.0, 10, 10, 10]), 6).tolist()
        [3, 1, 1, 1]
    """
    load_E = np.asarray(load_E, dtype=np.float64)
    E = load_E.shape[0]
    if num_slots < E:
        raise PlacementError(f"replicate: {num_slots} slots cannot hold {E} experts")
    replicas_E = np.ones(E, np.int64)
    for _ in range(num_slots - E):
        # ties go to the lowest expert id (argmax), so the plan is deterministic
        replicas_E[int(np.argmax(load_E / replicas_E))] += 1
    return replicas_E


def pack_lpt(weights_N: np.ndarray, num_bins: int, capacity: int,
             groups_N: np.ndarray | None = None) -> np.ndarray:
    """Bin of each item: heaviest first, each to the lightest bin that still has room.

    Longest-processing-time scheduling with ``capacity`` items per bin (``num_bins * capacity``
    must equal the number of items). Ties go to the lower item index and the lower bin. With
    ``groups_N`` (e.g. the expert of each replica), an item avoids bins that already hold an item
    of its group while another bin has room: two replicas of one expert on one GPU balance nothing.

    Example:
        >>> pack_lpt(np.array([8.0, 7, 6, 5, 4, 3, 2, 1]), 2, 4).tolist()
        [0, 1, 1, 0, 0, 1, 1, 0]
    """
    weights_N = np.asarray(weights_N, dtype=np.float64)
    N = weights_N.shape[0]
    if num_bins * capacity != N:
        raise PlacementError(f"pack_lpt: {num_bins} bins x {capacity} slots != {N} items")
    order = np.argsort(-weights_N, kind="stable")
    load_G = np.zeros(num_bins)
    count_G = np.zeros(num_bins, np.int64)
    bin_N = np.empty(N, np.int64)
    held: list[set[int]] = [set() for _ in range(num_bins)]
    for i in order:
        open_G = count_G < capacity
        if groups_N is not None:
            fresh_G = open_G & np.array([int(groups_N[i]) not in h for h in held])
            if fresh_G.any():
                open_G = fresh_G
            held_by = int(groups_N[i])
        g = int(np.argmin(np.where(open_G, load_G, np.inf)))
        if groups_N is not None:
            held[g].add(held_by)
        bin_N[i] = g
        load_G[g] += weights_N[i]
        count_G[g] += 1
    return bin_N


def _balanced_row(load_E: np.ndarray, ep_size: int, slots_per_gpu: int) -> np.ndarray:
    E = load_E.shape[0]
    P = ep_size * slots_per_gpu
    replicas_E = replicate(load_E, P)
    expert_N = np.repeat(np.arange(E), replicas_E)  # one item per replica
    weight_N = (load_E / replicas_E)[expert_N]
    bin_N = pack_lpt(weight_N, ep_size, slots_per_gpu, expert_N)
    # slots of GPU g are [g*S, (g+1)*S); within a GPU, experts ascending (stable, readable)
    order = np.lexsort((expert_N, bin_N))
    return expert_N[order]


def balanced_placement(load_LE: Any, ep_size: int, *, redundant: int = 0) -> Placement:
    """A placement balanced for ``load_LE`` (EPLB-style replication + LPT packing, per layer).

    A layer whose balanced plan is not better than the contiguous default keeps the default.
    """
    load_LE = _check_load(load_LE, None, None)
    L, E = load_LE.shape
    S = _check_sizes(E, ep_size, redundant)
    default = contiguous_placement(E, ep_size, num_layers=L, redundant=redundant)
    rows = np.stack([_balanced_row(load_LE[layer], ep_size, S) for layer in range(L)]) \
        if L else default.physical_to_logical_LP
    plan = Placement(physical_to_logical_LP=rows, num_experts=E, ep_size=ep_size)
    keep_L = _better_L(plan.gpu_load_LG(load_LE), default.gpu_load_LG(load_LE))
    rows = np.where(keep_L[:, None], rows, default.physical_to_logical_LP)
    return Placement(physical_to_logical_LP=rows, num_experts=E, ep_size=ep_size)


def _better_L(a_LG: np.ndarray, b_LG: np.ndarray) -> np.ndarray:
    """Layers where ``a`` beats ``b``: a lower busiest GPU, or an equal one and fewer hot GPUs
    (a lower sum of squares)."""
    a_max, b_max = a_LG.max(axis=1), b_LG.max(axis=1)
    tol = 1e-9 * np.maximum(b_max, 1.0)
    same = np.abs(a_max - b_max) <= tol
    return (a_max < b_max - tol) | (same & ((a_LG ** 2).sum(axis=1) < (b_LG ** 2).sum(axis=1) - tol))


@dataclass(frozen=True, kw_only=True)
class PlacementPlan:
    """The default and the balanced placement of one load, with their per-GPU loads."""

    moe_layers: tuple[int, ...]
    load_LE: np.ndarray
    default: Placement
    balanced: Placement

    @property
    def ep_size(self) -> int:
        return self.default.ep_size

    @property
    def redundant(self) -> int:
        return self.default.num_redundant

    @property
    def before_LG(self) -> np.ndarray:
        return self.default.gpu_load_LG(self.load_LE)

    @property
    def after_LG(self) -> np.ndarray:
        return self.balanced.gpu_load_LG(self.load_LE)

    @property
    def before_L(self) -> np.ndarray:
        """max/mean per GPU of the default placement, per layer."""
        return max_over_mean(self.before_LG)

    @property
    def after_L(self) -> np.ndarray:
        return max_over_mean(self.after_LG)


def plan_placement(load_LE: Any, ep_size: int, *, redundant: int = 0,
                   moe_layers: Any = None) -> PlacementPlan:
    """Default and balanced placement of ``load_LE`` (e.g. ``summary.counts_LE``) on ``ep_size`` GPUs.

    Example:
        >>> plan = plan_placement([[8, 7, 6, 5, 4, 3, 2, 1]], 2)
        >>> plan.before_LG.tolist(), plan.after_LG.tolist()
        ([[26.0, 10.0]], [[18.0, 18.0]])
    """
    load_LE = _check_load(load_LE, None, None)
    L, E = load_LE.shape
    layers = tuple(range(L)) if moe_layers is None else tuple(int(x) for x in moe_layers)
    if len(layers) != L:
        raise PlacementError(f"moe_layers: expected {L} layer numbers (one per load row), got "
                             f"{len(layers)}")
    return PlacementPlan(
        moe_layers=layers, load_LE=load_LE,
        default=contiguous_placement(E, ep_size, num_layers=L, redundant=redundant),
        balanced=balanced_placement(load_LE, ep_size, redundant=redundant))


# ---- files an engine loads --------------------------------------------------------------------
def placement_document(plan: PlacementPlan, fmt: str, *,
                       num_hidden_layers: int | None = None) -> dict[str, Any]:
    """The JSON document of ``plan.balanced`` in format ``fmt`` (see :func:`write_placement`)."""
    p = plan.balanced
    if fmt == "sglang":
        # SGLang indexes every decoder layer (dense ones included): dense rows keep the trivial map
        n = max(plan.moe_layers) + 1 if num_hidden_layers is None else num_hidden_layers
        if plan.moe_layers and max(plan.moe_layers) >= n:
            raise PlacementError(f"num_hidden_layers: expected more than the highest MoE layer "
                                 f"{max(plan.moe_layers)}, got {n}")
        trivial = np.arange(p.num_slots) % p.num_experts
        rows = [trivial.tolist() for _ in range(n)]
        for i, layer in enumerate(plan.moe_layers):
            rows[layer] = p.physical_to_logical_LP[i].tolist()
        # NOTE: SGLang passes the keys of this file as keyword arguments: it must hold this key only
        return {"physical_to_logical_map": rows}
    if fmt == "vllm":
        return {
            "physical_to_logical_map": p.physical_to_logical_LP.tolist(),
            "logical_to_physical_map": p.logical_to_physical_LEX().tolist(),
            "logical_replica_count": p.replicas_LE.tolist(),
        }
    if fmt == "routecap":
        return {
            "format": "routecap.placement", "format_version": 1,
            "ep_size": p.ep_size, "num_experts": p.num_experts, "num_redundant": p.num_redundant,
            "slots_per_gpu": p.slots_per_gpu, "moe_layers": list(plan.moe_layers),
            "physical_to_logical_map": p.physical_to_logical_LP.tolist(),
            "max_over_mean_before": [_round(x) for x in plan.before_L],
            "max_over_mean_after": [_round(x) for x in plan.after_L],
            "load": plan.load_LE.tolist(),
        }
    raise PlacementError(f"format: expected one of {PLACEMENT_FORMATS}, got {fmt!r}")


def _round(x: float) -> float | None:
    return None if not np.isfinite(x) else round(float(x), 6)


def write_placement(plan: PlacementPlan, path: str | os.PathLike, fmt: str = "sglang", *,
                    num_hidden_layers: int | None = None) -> dict[str, Any]:
    """Write ``plan.balanced`` as JSON an engine loads, atomically; returns the document.

    * ``sglang``: ``{"physical_to_logical_map": [num_hidden_layers][E + R]}``, the file SGLang's
      ``--init-expert-location`` reads (dense layers hold the trivial map);
    * ``vllm``: the three maps of vLLM's ``EplbState`` over the MoE layers
      (``physical_to_logical_map``, ``logical_to_physical_map`` padded with -1 to R + 1 columns,
      ``logical_replica_count``);
    * ``routecap``: the map with its sizes, layer numbers, the load and max/mean before and after.
    """
    doc = placement_document(plan, fmt, num_hidden_layers=num_hidden_layers)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    os.replace(tmp, path)
    return doc
