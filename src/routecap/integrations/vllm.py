"""vLLM: a general plugin that fixes data-parallel capture on vLLM 0.16-0.19, and output adapters.

Shape legend: T tokens, L MoE layers, A all decoder layers (vLLM's width), K top-k, E experts.

**The plugin.** vLLM 0.16 to 0.19 ship ``RoutedExpertsCapturer.capture`` with
``assert cumsum[-1] == topk_ids.shape[0]``: it assumes the router saw every DP rank's tokens
(naive dispatch) and crashes with ``--data-parallel-size > 1`` when the quantization method takes
the modular-kernel path, where the router sees only the local tokens. :func:`register` is a
``vllm.general_plugins`` entry point (vLLM loads it in every process). It tests the installed
capturer's *behaviour*, not its version string: if a local-layout call fails the way the seed
bug does, it replaces ``capture`` with routecap's layout logic (gathered, padded and local rows;
a clear error naming every size otherwise; ``ROUTECAP_VLLM_LENIENT=1`` marks the rank's rows of
that layer missing with -1 instead), and logs once what it did. It also makes rows that no capture
wrote read -1 (the buffer is filled with -1 at start-up and after every step's save), where vLLM
leaves 0 or the previous step's routes: with K = 1 a zero row is a valid-looking expert 0. On any
other vLLM it does nothing and says so at debug level (``ROUTECAP_VLLM_FILL_MISSING=1`` opts into
the -1 fill there). It never lets an exception escape into vLLM's start-up.

**The adapters.** vLLM returns ``CompletionOutput.routed_experts`` as int32 ``[T, A, K]`` over
*all* decoder layers, dense layers as zero rows that look like expert 0; later vLLM's
OpenAI server returns base64 of an ``.npy`` file. :func:`from_vllm` keeps the MoE layers only
(checking that the others are zero), marks rows that cannot be routes as missing (all-zero rows
with K > 1, which a skipped capture leaves, and -1 rows), and :func:`to_vllm` gives the exact
array back (also when one array holds both kinds). With K = 1 a zero row cannot be told from expert
0 by the adapter: only the plugin's -1 fill makes such rows recognisable.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..capturer import copy_segments
from ..layout import LayoutError, RankView, infer_layout
from ..trace import RoutingTrace

__all__ = [
    "PLUGIN_STATUS",
    "RoutecapVLLMError",
    "from_vllm",
    "from_request_output",
    "from_vllm_b64npy",
    "plugin_status",
    "register",
    "to_vllm",
    "to_vllm_b64npy",
]

logger = logging.getLogger("routecap.vllm")
_MARKER = "_routecap_patched"
#: What :func:`register` found and did in this process (``routecap doctor`` prints it).
PLUGIN_STATUS: dict[str, Any] = {"loaded": False}


class RoutecapVLLMError(RuntimeError):
    """vLLM's router rows fit no data-parallel layout (the message names every size)."""


# ---- the plugin ---------------------------------------------------------------------------------
def _capturer_module() -> Any:
    from vllm.model_executor.layers.fused_moe import routed_experts_capturer as rec

    return rec


def has_seed_bug(rec: Any) -> bool | None:
    """True if the capturer asserts on local-layout rows (the seed bug), False if it accepts
    them, None if it cannot be tested (another interface)."""
    import torch

    cls = getattr(rec, "RoutedExpertsCapturer", None)
    if cls is None or not hasattr(rec, "get_forward_context"):
        return None
    try:
        cap = cls()
    except Exception:  # noqa: BLE001 - another constructor: not the capturer we know
        return None
    counts = torch.tensor([2, 3], dtype=torch.int32)

    class _DP:
        num_tokens_across_dp_cpu = counts
        max_tokens_across_dp_cpu = counts.max()

    class _Ctx:
        dp_metadata = _DP()

    saved = rec.get_forward_context
    rec.get_forward_context = lambda: _Ctx()
    try:
        cap._device_buffer = torch.zeros((4, 1, 2), dtype=torch.int32)
        cap.dp_rank = 1
        local = torch.tensor([[1, 2], [3, 4], [5, 6]], dtype=torch.int32)  # this rank's 3 rows
        try:
            cls.capture(cap, 0, local)
        except AssertionError:
            return True
        except Exception:  # noqa: BLE001 - it failed some other way: leave it alone
            return None
        return not bool((cap._device_buffer[:3, 0] == local).all())
    finally:
        rec.get_forward_context = saved


def _routecap_capture(self: Any, layer_id: int, topk_ids: Any) -> None:
    """routecap's replacement for ``RoutedExpertsCapturer.capture`` (vLLM 0.16-0.19)."""
    rec = _capturer_module()
    buf = self._device_buffer
    if layer_id >= buf.shape[1]:
        return  # layers past the model's (MTP) are not captured, as vLLM does
    n = int(topk_ids.shape[0])
    ctx = rec.get_forward_context()
    dp = getattr(ctx, "dp_metadata", None)
    if dp is None:
        segments = ((0, n),)
    else:
        # NOTE: a CPU tensor (vLLM keeps the counts on the host): no device sync
        counts = [int(c) for c in dp.num_tokens_across_dp_cpu.tolist()]
        view = RankView(tokens_per_dp=counts, dp_rank=int(self.dp_rank))
        try:
            plan = infer_layout(view, n)
        except LayoutError as e:
            mine = counts[int(self.dp_rank)]
            if os.environ.get("ROUTECAP_VLLM_LENIENT") == "1":
                buf[:mine, layer_id, :] = -1  # missing, never a stale route
                if not getattr(self, "_routecap_warned", False):
                    self._routecap_warned = True
                    logger.warning("routecap: layer %d: %s; marked this rank's %d rows missing "
                                   "(-1) (warned once)", layer_id, e, mine)
                return
            raise RoutecapVLLMError(f"routecap: vLLM routed-experts capture, layer {layer_id}: "
                                    f"{e}") from None
        segments = plan.segments
    copy_segments(buf[:, layer_id, :], topk_ids, segments)


# NOTE: vLLM's buffer starts as zeros and is only overwritten by capture(): the rows of a layer that
# did not capture in a step (a kernel path without the hook) keep the previous step's routes, or 0,
# which with K = 1 is a valid-looking expert 0. Where routecap owns capture (the patched versions),
# it also makes "not captured" explicit: -1 in the buffer at start-up and after every step's save.
def _fill_missing(self: Any) -> None:
    if getattr(self, "_device_buffer", None) is not None:
        self._device_buffer.fill_(-1)


def _wrap_fill(cls: Any) -> None:
    init, save = cls.init_buffer, cls.save_captured_experts

    def init_buffer(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        _fill_missing(self)
        host = getattr(self, "_host_buffer_view", None)
        if host is not None:
            host.fill(-1)

    def save_captured_experts(self: Any, *args: Any, **kwargs: Any) -> None:
        save(self, *args, **kwargs)
        _fill_missing(self)  # one fill kernel per step, outside the graphed forward

    cls.init_buffer = init_buffer
    cls.save_captured_experts = save_captured_experts
    cls.clear_buffer = _fill_missing


def _fillable(cls: Any) -> bool:
    return all(callable(getattr(cls, m, None))
               for m in ("init_buffer", "save_captured_experts", "clear_buffer"))


def register() -> None:
    """The ``vllm.general_plugins`` entry point. Idempotent; never raises."""
    try:
        PLUGIN_STATUS.update(_install())
    except Exception as e:  # noqa: BLE001 - a plugin must never break vLLM's start-up
        PLUGIN_STATUS.update(loaded=True, patched=False, reason=f"{type(e).__name__}: {e}")
        logger.warning("routecap plugin: left vLLM unchanged (%s: %s)", type(e).__name__, e)


def _install() -> dict[str, Any]:
    try:
        import vllm

        version = getattr(vllm, "__version__", "?")
    except ImportError:
        return {"loaded": True, "patched": False, "vllm": None, "reason": "vLLM is not installed"}
    try:
        rec = _capturer_module()
    except ImportError:
        logger.debug("routecap plugin: vLLM %s has no routed-experts capturer; nothing to do",
                     version)
        return {"loaded": True, "patched": False, "vllm": version,
                "reason": "this vLLM has no routed-experts capturer"}
    cls = rec.RoutedExpertsCapturer
    if getattr(cls, _MARKER, False):
        return {"loaded": True, "patched": True, "vllm": version,
                "reason": "already patched in this process"}
    bug = has_seed_bug(rec)
    opt_in = os.environ.get("ROUTECAP_VLLM_FILL_MISSING") == "1"
    if bug is not True:
        why = ("its capture() already handles local-layout rows" if bug is False
               else "its capturer has an interface routecap does not know")
        if bug is False and opt_in and _fillable(cls):
            _wrap_fill(cls)
            setattr(cls, _MARKER, True)
            logger.info("routecap plugin: vLLM %s: rows not captured read -1 "
                        "(ROUTECAP_VLLM_FILL_MISSING=1)", version)
            return {"loaded": True, "patched": True, "vllm": version, "fills_missing": True,
                    "reason": why + "; uncaptured rows read -1 (ROUTECAP_VLLM_FILL_MISSING=1)"}
        logger.debug("routecap plugin: vLLM %s left unchanged: %s", version, why)
        return {"loaded": True, "patched": False, "vllm": version, "reason": why}
    cls.capture = _routecap_capture
    fills = _fillable(cls)
    if fills:
        _wrap_fill(cls)
    setattr(cls, _MARKER, True)
    logger.info("routecap plugin: vLLM %s: replaced RoutedExpertsCapturer.capture, which asserts "
                "that the router saw every data-parallel rank's tokens, with routecap's layout "
                "logic (gathered, padded and local rows; a clear error otherwise)", version)
    return {"loaded": True, "patched": True, "vllm": version, "fills_missing": fills,
            "reason": "the installed capture() asserts on local-layout rows (the DP>1 "
                      "modular-kernel crash)"}


def plugin_status() -> dict[str, Any]:
    """What the plugin would do here (runs :func:`register` in this process)."""
    register()
    status = dict(PLUGIN_STATUS)
    try:
        from importlib.metadata import entry_points

        eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "routecap"]
        status["entry_point"] = eps[0].value if eps else None
    except Exception:  # noqa: BLE001
        status["entry_point"] = None
    allowed = os.environ.get("VLLM_PLUGINS")
    status["vllm_plugins_env"] = allowed
    status["enabled_by_env"] = allowed is None or "routecap" in allowed.split(",")
    return status


# ---- adapters -----------------------------------------------------------------------------------
def from_vllm(routed_experts: np.ndarray, *, moe_layers: Sequence[int], num_experts: int,
              request_id: str, prompt_len: int, start: int = 0, model: str = "",
              token_ids: Sequence[int] | None = None) -> RoutingTrace:
    """A trace from vLLM's ``CompletionOutput.routed_experts`` (``[T, A, K]`` over all layers).

    ``moe_layers``: which of the A decoder layers are MoE layers (see
    :func:`routecap.integrations.hf_routers.moe_config`); the others must be zero rows.
    Rows of MoE layers that cannot be routes are marked missing: all-zero rows when K > 1 (a
    capture that never ran, e.g. a monolithic MoE kernel) and rows of -1 (routecap's plugin in
    lenient mode).
    """
    a = np.asarray(routed_experts)
    if a.ndim != 3 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"from_vllm: expected an integer array [T, num_layers, K], got "
                         f"{a.dtype} {a.shape}")
    layers = list(moe_layers)
    A = a.shape[1]
    if not layers or max(layers) >= A or min(layers) < 0:
        raise ValueError(f"from_vllm: moe_layers {layers} do not fit an array of {A} layers")
    dense = [i for i in range(A) if i not in set(layers)]
    if dense and a[:, dense].any():
        i = next(d for d in dense if a[:, d].any())
        raise ValueError(f"from_vllm: layer {i} is not in moe_layers but holds non-zero ids; "
                         "the moe_layers given do not match this model")
    ids = a[:, layers].astype(np.int64)
    K = ids.shape[2]
    neg = (ids == -1).all(axis=2)
    zero = (ids == 0).all(axis=2) if K > 1 else np.zeros(ids.shape[:2], bool)
    missing = neg | zero
    fill = -1 if neg.any() and not zero.any() else 0
    tok = None if token_ids is None else np.asarray(token_ids, np.int32)
    extra: dict[str, Any] = {"vllm": {"num_layers": A, "dtype": a.dtype.str, "missing_fill": fill}}
    if neg.any() and zero.any():
        # both kinds in one array: remember which missing cells were -1, so to_vllm gives it back
        extra["vllm"]["minus_one_cells"] = np.argwhere(neg).tolist()
    return RoutingTrace.from_ids(ids, num_experts=num_experts, moe_layers=layers,
                                 request_id=request_id, prompt_len=prompt_len, start=start,
                                 model=model, missing=missing if missing.any() else None,
                                 token_ids=tok, extra=extra)


def from_request_output(request_output: Any, config: Any, *, model: str = "",
                        num_experts: int | None = None) -> list[RoutingTrace]:
    """One trace per completion of a vLLM ``RequestOutput`` (``LLM.generate`` with
    ``enable_return_routed_experts=True``), dense layers dropped using the model's config.

    ``config``: the model's transformers config (``llm.llm_engine.model_config.hf_config``, or
    ``AutoConfig.from_pretrained(path)``). Token ids travel with the trace: the prompt plus the
    generated tokens but the last, whose forward never ran.
    """
    from .hf_routers import moe_config

    moe = moe_config(config)
    layers, E = moe.moe_layers, num_experts or moe.num_experts
    prompt = list(request_output.prompt_token_ids or [])
    traces = []
    for c in request_output.outputs:
        arr = getattr(c, "routed_experts", None)
        if arr is None:
            raise ValueError(
                f"request {request_output.request_id!r}, completion {c.index}: no routed_experts "
                "(start vLLM with enable_return_routed_experts=True; vLLM returns none for "
                "streamed chunks before the last and for stop-string finishes)")
        tokens = (prompt + list(c.token_ids))[:arr.shape[0]]
        rid = str(request_output.request_id) + (f"/{c.index}" if len(request_output.outputs) > 1
                                                 else "")
        traces.append(from_vllm(np.asarray(arr), moe_layers=layers, num_experts=int(E),
                                request_id=rid, prompt_len=len(prompt), model=model,
                                token_ids=tokens if len(tokens) == arr.shape[0] else None))
    return traces


def to_vllm(trace: RoutingTrace, *, num_layers: int | None = None,
            dtype: str | np.dtype | None = None) -> np.ndarray:
    """vLLM's ``routed_experts`` array for a trace: ``[T, A, K]``, dense layers zero.

    ``num_layers`` and ``dtype`` default to what :func:`from_vllm` recorded (else A = the last MoE
    layer + 1, int32); missing rows are written the way they came (0 or -1).
    """
    rec = trace.extra.get("vllm", {}) if isinstance(trace.extra.get("vllm"), dict) else {}
    A = num_layers if num_layers is not None else rec.get("num_layers", trace.moe_layers[-1] + 1)
    dt = np.dtype(dtype if dtype is not None else rec.get("dtype", "<i4"))
    if trace.moe_layers[-1] >= A:
        raise ValueError(f"to_vllm: MoE layer {trace.moe_layers[-1]} does not fit {A} layers")
    out = np.zeros((trace.num_tokens, A, trace.top_k), dt)
    ids = trace.to_numpy(fill=int(rec.get("missing_fill", 0)))
    cells = rec.get("minus_one_cells")
    if cells:
        tl = np.asarray(cells, dtype=np.int64).reshape(-1, 2)
        inside = (tl[:, 0] < trace.num_tokens) & (tl[:, 1] < trace.num_layers)
        tl = tl[inside]
        if trace.missing is not None:
            tl = tl[trace.missing[tl[:, 0], tl[:, 1]]]  # only cells still missing
            ids[tl[:, 0], tl[:, 1]] = -1
    out[:, list(trace.moe_layers)] = ids.astype(dt)
    return out


def _load_npy(raw: bytes) -> np.ndarray:
    """An integer array from ``.npy`` bytes, every size checked before anything is allocated."""
    f = io.BytesIO(raw)
    fmt = np.lib.format
    try:
        major, _ = fmt.read_magic(f)
        read = {1: fmt.read_array_header_1_0, 2: fmt.read_array_header_2_0}.get(major)
        if read is None:
            raise ValueError(f"npy version {major}")
        with warnings.catch_warnings():  # hostile headers make numpy's parser chatty
            warnings.simplefilter("ignore")
            shape, fortran, dtype = read(f)
    except Exception as e:  # noqa: BLE001 - numpy parses hostile headers with many exceptions
        raise ValueError(f"bad .npy header ({type(e).__name__}: {e})"[:200]) from None
    if not np.issubdtype(dtype, np.integer) or dtype.hasobject:
        raise ValueError(f"expected an integer array, got dtype {dtype}")
    count = int(np.prod(shape, dtype=object))
    if count * dtype.itemsize != len(raw) - f.tell():
        raise ValueError(f"the header promises {shape} {dtype} ({count * dtype.itemsize} bytes), "
                         f"the data holds {len(raw) - f.tell()}")
    arr = np.frombuffer(raw, dtype, count=count, offset=f.tell())
    return arr.reshape(shape, order="F" if fortran else "C")


def from_vllm_b64npy(data: str | bytes, **kwargs: Any) -> RoutingTrace:
    """A trace from the base64 ``.npy`` string of vLLM's OpenAI-compatible ``routed_experts``."""
    try:
        arr = _load_npy(base64.b64decode(data, validate=True))
    except (ValueError, TypeError) as e:
        raise ValueError(f"from_vllm_b64npy: not base64 of a .npy array ({e})") from None
    return from_vllm(arr, **kwargs)


def to_vllm_b64npy(trace: RoutingTrace, **kwargs: Any) -> str:
    """The base64 ``.npy`` string for a trace (see :func:`to_vllm` for the arguments)."""
    buf = io.BytesIO()
    np.save(buf, to_vllm(trace, **kwargs), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")
