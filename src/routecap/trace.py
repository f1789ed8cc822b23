"""The routing-trace contract: one request's routes, ``[T, L, K]``, and everything needed to read them.

Shape legend: T tokens (positions whose forward ran), L MoE layers, K experts per token (top-k),
E experts.

A :class:`RoutingTrace` holds, for one request,

* ``expert_ids``   ``[T, L, K]`` logical expert ids in ``[0, E)``, in the narrowest unsigned dtype
  that holds every id (``uint8`` up to 256 experts, ``uint16`` up to 65536);
* ``missing``      ``[T, L]`` bool, True where the route of that token at that layer is unknown, or
  ``None`` when nothing is missing (the common case costs nothing). Missing cells hold 0 in
  ``expert_ids``; the mask, not the value, says they are missing, so a missing route can never be
  read as expert 0 by anyone who honours the mask (and :meth:`RoutingTrace.to_numpy` fills -1);
* ``moe_layers``   the model layer number of each of the L entries (dense layers are not in it);
* ``start``        the absolute position of row 0 (0 unless the trace is a later turn or a slice);
* ``prompt_len``   the request's prompt length in tokens (absolute, independent of ``start``);
* ``token_ids``    optional ``[T]`` the input token at each position (lets a trainer check that
  it replays the routes of the very tokens it trains on).

T counts the positions whose forward ran: prompt plus generated tokens minus the last sampled
token, which never went through the model. The K ids of a row are in the router's own order
(``topk_order="router"``) unless ``topk_order="sorted"`` says they were sorted ascending.

All checks live in :func:`validate_trace`; every error names the field, what was expected and what
came.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "TOPK_ORDERS",
    "RoutingTrace",
    "TraceValidationError",
    "id_dtype_for",
    "validate_trace",
]

#: Version of the trace contract and of the files that carry it. Bumped on any incompatible change.
FORMAT_VERSION = 1
#: ``router``: the K ids of a row in the order the router produced them; ``sorted``: ascending.
TOPK_ORDERS = ("router", "sorted")
_MAX_EXPERTS = 1 << 16


class TraceValidationError(ValueError):
    """A trace (or the data meant to become one) breaks the contract.

    ``field`` names the offending field; the message says what was expected and what came.
    """

    def __init__(self, field_name: str, expected: str, actual: object, *, hint: str = ""):
        self.field = field_name
        self.expected = expected
        self.actual = actual
        msg = f"RoutingTrace.{field_name}: expected {expected}, got {actual}"
        if hint:
            msg += f". {hint}"
        super().__init__(msg)


def id_dtype_for(num_experts: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every expert id of a model with ``num_experts``.

    Example:
        >>> id_dtype_for(128), id_dtype_for(256), id_dtype_for(257)
        (dtype('uint8'), dtype('uint8'), dtype('uint16'))
    """
    if isinstance(num_experts, bool) or not isinstance(num_experts, (int, np.integer)):
        raise TraceValidationError("num_experts", "an int", type(num_experts).__name__)
    if not 1 <= num_experts <= _MAX_EXPERTS:
        raise TraceValidationError("num_experts", f"an int in [1, {_MAX_EXPERTS}]", num_experts)
    return np.dtype(np.uint8) if num_experts <= 256 else np.dtype(np.uint16)


@dataclass(frozen=True, kw_only=True, eq=False)
class RoutingTrace:
    """One request's routes and the metadata needed to use them. See the module docstring.

    Build one from any integer array with :meth:`from_ids` (it narrows the dtype and checks the
    range); the constructor itself only accepts data that already satisfies the contract.

    Example:
        >>> import numpy as np
        >>> t = RoutingTrace.from_ids(np.array([[[3, 1]], [[0, 2]]]), num_experts=4,
        ...                           moe_layers=[1], request_id="r0", prompt_len=2)
        >>> t.expert_ids.dtype, t.num_tokens, t.num_layers, t.top_k
        (dtype('uint8'), 2, 1, 2)
    """

    expert_ids: np.ndarray
    num_experts: int
    moe_layers: tuple[int, ...]
    request_id: str
    prompt_len: int
    start: int = 0
    model: str = ""
    missing: np.ndarray | None = None
    token_ids: np.ndarray | None = None
    topk_order: str = "router"
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.moe_layers, (list, np.ndarray)):
            object.__setattr__(self, "moe_layers", tuple(int(x) for x in self.moe_layers))
        if isinstance(self.missing, np.ndarray) and self.missing.dtype == np.bool_:
            if not self.missing.any():
                # NOTE: an all-False mask is dropped so that "nothing missing" has one spelling.
                object.__setattr__(self, "missing", None)
        validate_trace(self)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_ids(
        cls,
        expert_ids: Any,
        *,
        num_experts: int,
        moe_layers: Any,
        request_id: str,
        prompt_len: int,
        missing: Any = None,
        **kwargs: Any,
    ) -> RoutingTrace:
        """Build a trace from integer ids of any dtype (torch or numpy), checking their range.

        Cells marked in ``missing`` may hold anything (they are zeroed); every other id must lie in
        ``[0, num_experts)``, else :class:`TraceValidationError` names the first bad cell.
        """
        ids = _as_numpy(expert_ids)
        if ids.ndim != 3:
            raise TraceValidationError("expert_ids", "a 3-d array [T, L, K]", f"shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise TraceValidationError("expert_ids", "an integer array", f"dtype {ids.dtype}")
        dtype = id_dtype_for(num_experts)
        miss = None
        if missing is not None:
            miss = _as_numpy(missing)
            if miss.shape != ids.shape[:2] or miss.dtype != np.bool_:
                raise TraceValidationError(
                    "missing", f"a bool array of shape {ids.shape[:2]}", f"{miss.dtype} {miss.shape}"
                )
        bad = (ids < 0) | (ids >= num_experts)
        if miss is not None:
            bad &= ~miss[:, :, None]
        if bad.any():
            t, layer, k = (int(v) for v in np.argwhere(bad)[0])
            raise TraceValidationError(
                "expert_ids",
                f"ids in [0, {num_experts})",
                f"{int(ids[t, layer, k])} at [token {t}, layer {layer}, slot {k}]",
            )
        out = ids.astype(dtype, copy=True)
        if miss is not None and miss.any():
            out[miss] = 0
        else:
            miss = None
        return cls(
            expert_ids=out,
            num_experts=int(num_experts),
            moe_layers=tuple(int(x) for x in moe_layers),
            request_id=request_id,
            prompt_len=int(prompt_len),
            missing=miss,
            **kwargs,
        )

    @classmethod
    def from_verified(
        cls,
        *,
        expert_ids: np.ndarray,
        num_experts: int,
        moe_layers: Any,
        request_id: str,
        prompt_len: int,
        start: int = 0,
        model: str = "",
        missing: np.ndarray | None = None,
        token_ids: np.ndarray | None = None,
        topk_order: str = "router",
        extra: dict[str, Any] | None = None,
    ) -> RoutingTrace:
        """The trusted constructor: a trace over arrays whose contents the caller has verified.

        For readers of bytes that were checked on the way in (the wire decoder checks every row
        while it decodes; the file reader checks CRC-32s, or was told not to read the data), so
        the ids are not scanned a second time. Every rule that does not read the arrays' contents
        is still checked (metadata, shapes, dtypes), raising :class:`TraceValidationError`; what
        is trusted, and must hold, is: ids in ``[0, num_experts)``, K distinct ids per row,
        ascending where ``topk_order="sorted"``, and 0 under the ``missing`` mask. Anything else
        builds traces with :meth:`from_ids` or the constructor, which check everything.
        ``moe_layers`` becomes a tuple and an all-False ``missing`` becomes ``None``, as in the
        constructor. The arrays are used as given (no copy: read-only views stay read-only).
        """
        t = object.__new__(cls)
        for name, value in (
            ("expert_ids", expert_ids), ("num_experts", num_experts),
            ("moe_layers", tuple(moe_layers) if isinstance(moe_layers, (list, tuple)) else moe_layers),
            ("request_id", request_id), ("prompt_len", prompt_len), ("start", start),
            ("model", model), ("missing", missing), ("token_ids", token_ids),
            ("topk_order", topk_order), ("format_version", FORMAT_VERSION),
            ("extra", {} if extra is None else extra),
        ):
            object.__setattr__(t, name, value)
        _validate_metadata(t)
        if t.missing is not None and not t.missing.any():
            object.__setattr__(t, "missing", None)  # "nothing missing" has one spelling
        return t

    # ---- shape --------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        """T: rows in the trace."""
        return int(self.expert_ids.shape[0])

    @property
    def num_layers(self) -> int:
        """L: MoE layers."""
        return int(self.expert_ids.shape[1])

    @property
    def top_k(self) -> int:
        """K: experts per token."""
        return int(self.expert_ids.shape[2])

    @property
    def end(self) -> int:
        """Absolute position one past the last row."""
        return self.start + self.num_tokens

    @property
    def dtype(self) -> np.dtype:
        return self.expert_ids.dtype

    @property
    def num_missing(self) -> int:
        """Number of (token, layer) cells whose route is missing."""
        return 0 if self.missing is None else int(self.missing.sum())

    @property
    def nbytes(self) -> int:
        n = self.expert_ids.nbytes
        n += 0 if self.missing is None else self.missing.nbytes
        n += 0 if self.token_ids is None else self.token_ids.nbytes
        return n

    # ---- views --------------------------------------------------------------------------------
    def to_numpy(self, fill: int = -1) -> np.ndarray:
        """``[T, L, K]`` as a signed array with ``fill`` in every missing cell (never expert 0)."""
        out = self.expert_ids.astype(np.int32)
        if self.missing is not None:
            out[self.missing] = fill
        return out

    def slice(self, start: int, end: int | None = None) -> RoutingTrace:
        """The rows of absolute positions ``[start, end)``, as a trace whose row 0 is ``start``."""
        end = self.end if end is None else end
        if not self.start <= start <= end <= self.end:
            raise TraceValidationError(
                "slice", f"self.start <= start <= end <= self.end = [{self.start}, {self.end}]",
                f"start={start}, end={end}",
            )
        a, b = start - self.start, end - self.start
        return replace(
            self,
            expert_ids=self.expert_ids[a:b],
            missing=None if self.missing is None else self.missing[a:b],
            token_ids=None if self.token_ids is None else self.token_ids[a:b],
            start=start,
        )

    def with_sorted_topk(self) -> RoutingTrace:
        """The same routes with the K ids of each row sorted ascending (``topk_order="sorted"``)."""
        if self.topk_order == "sorted":
            return self
        return replace(self, expert_ids=np.sort(self.expert_ids, axis=-1), topk_order="sorted")

    def metadata(self) -> dict[str, Any]:
        """The JSON-able metadata of this trace (everything but the arrays)."""
        return {
            "request_id": self.request_id,
            "model": self.model,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "moe_layers": list(self.moe_layers),
            "dtype": self.dtype.name,
            "start": self.start,
            "prompt_len": self.prompt_len,
            "num_tokens": self.num_tokens,
            "topk_order": self.topk_order,
            "format_version": self.format_version,
            "extra": self.extra,
        }

    def equals(self, other: RoutingTrace) -> bool:
        """Cell-for-cell and field-for-field equality (dtype included)."""
        if not isinstance(other, RoutingTrace) or self.metadata() != other.metadata():
            return False
        if not np.array_equal(self.expert_ids, other.expert_ids):
            return False
        for a, b in ((self.missing, other.missing), (self.token_ids, other.token_ids)):
            if (a is None) != (b is None) or (a is not None and not np.array_equal(a, b)):
                return False
        return self.token_ids is None or self.token_ids.dtype == other.token_ids.dtype

    def __repr__(self) -> str:
        return (
            f"RoutingTrace(request_id={self.request_id!r}, T={self.num_tokens}, "
            f"L={self.num_layers}, K={self.top_k}, E={self.num_experts}, start={self.start}, "
            f"prompt_len={self.prompt_len}, missing={self.num_missing}, model={self.model!r})"
        )


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch here
        # NOTE: a device-to-host copy; only ever called off the hot path.
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def validate_trace(trace: RoutingTrace) -> None:
    """Check every rule of the contract; raise :class:`TraceValidationError` on the first broken one.

    This is the one place where traces are validated: construction, file loading and decoding
    all call it (:meth:`RoutingTrace.from_verified` runs its metadata half only).
    """
    _validate_metadata(trace)
    _validate_ids(trace)


def _validate_metadata(t: RoutingTrace) -> None:
    """Every rule that does not read the arrays' contents: fields, shapes, dtypes."""
    if not _is_int(t.format_version) or t.format_version != FORMAT_VERSION:
        raise TraceValidationError(
            "format_version", f"{FORMAT_VERSION}", t.format_version,
            hint="the trace was made by a different routecap version",
        )
    dtype = id_dtype_for(t.num_experts)
    ids = t.expert_ids
    if not isinstance(ids, np.ndarray):
        raise TraceValidationError("expert_ids", "a numpy array", type(ids).__name__,
                                   hint="use RoutingTrace.from_ids(...) to convert")
    if ids.ndim != 3:
        raise TraceValidationError("expert_ids", "a 3-d array [T, L, K]", f"shape {ids.shape}")
    if ids.dtype != dtype:
        raise TraceValidationError(
            "expert_ids", f"dtype {dtype.name} (narrowest for num_experts={t.num_experts})",
            f"dtype {ids.dtype}", hint="use RoutingTrace.from_ids(...) to narrow",
        )
    T, L, K = ids.shape
    if not isinstance(t.moe_layers, tuple) or not all(_is_int(x) for x in t.moe_layers):
        raise TraceValidationError("moe_layers", "a tuple of ints", repr(t.moe_layers))
    if len(t.moe_layers) != L:
        raise TraceValidationError("moe_layers", f"{L} entries (one per L of expert_ids)",
                                   f"{len(t.moe_layers)} entries {list(t.moe_layers)}")
    if any(x < 0 for x in t.moe_layers) or any(
        b <= a for a, b in zip(t.moe_layers, t.moe_layers[1:])
    ):
        raise TraceValidationError("moe_layers", "strictly increasing non-negative layer numbers",
                                   list(t.moe_layers))
    if not 1 <= K <= t.num_experts:
        raise TraceValidationError("top_k", f"K in [1, num_experts={t.num_experts}]", K)
    if L == 0:
        raise TraceValidationError("moe_layers", "at least one MoE layer", "none")
    if not isinstance(t.request_id, str):
        raise TraceValidationError("request_id", "a str", type(t.request_id).__name__)
    for name in ("start", "prompt_len"):
        v = getattr(t, name)
        if not _is_int(v) or v < 0:
            raise TraceValidationError(name, "a non-negative int", repr(v))
    if not isinstance(t.model, str):
        raise TraceValidationError("model", "a str", type(t.model).__name__)
    if t.topk_order not in TOPK_ORDERS:
        raise TraceValidationError("topk_order", f"one of {TOPK_ORDERS}", repr(t.topk_order))
    if t.missing is not None:
        m = t.missing
        if not isinstance(m, np.ndarray) or m.dtype != np.bool_ or m.shape != (T, L):
            raise TraceValidationError(
                "missing", f"None or a bool array of shape {(T, L)}",
                f"{getattr(m, 'dtype', type(m).__name__)} {getattr(m, 'shape', '')}",
            )
    if t.token_ids is not None:
        tok = t.token_ids
        if not isinstance(tok, np.ndarray) or tok.shape != (T,) or tok.dtype != np.int32:
            raise TraceValidationError(
                "token_ids", f"None or an int32 array of shape {(T,)}",
                f"{getattr(tok, 'dtype', type(tok).__name__)} {getattr(tok, 'shape', '')}",
            )
    try:
        json.dumps(t.extra)
    except (TypeError, ValueError) as e:
        raise TraceValidationError("extra", "a JSON-serialisable dict", f"{e}") from None
    if not isinstance(t.extra, dict):
        raise TraceValidationError("extra", "a dict", type(t.extra).__name__)


def _validate_ids(t: RoutingTrace) -> None:
    """The rules on the ids themselves (one pass over the data); metadata already checked."""
    dtype = t.expert_ids.dtype
    ids = t.expert_ids
    T, L, K = ids.shape
    if T and t.num_experts < (1 << (dtype.itemsize * 8)):
        hi = int(ids.max())
        if hi >= t.num_experts:
            cell = tuple(int(v) for v in np.argwhere(ids >= t.num_experts)[0])
            raise TraceValidationError("expert_ids", f"ids in [0, {t.num_experts})",
                                       f"{hi} at [token, layer, slot] {list(cell)}")
    if t.missing is not None and ids[t.missing].any():
        raise TraceValidationError("expert_ids", "0 in every cell marked missing",
                                   "non-zero ids under the missing mask",
                                   hint="use RoutingTrace.from_ids(...) which zeroes them")
    if K > 1 and T:
        # A router picks K distinct experts; a repeated id in a row is corrupt data.
        srt = np.sort(ids, axis=-1)
        dup = (srt[..., 1:] == srt[..., :-1]).any(-1)
        if t.missing is not None:
            dup &= ~t.missing
        if dup.any():
            tok, layer = (int(v) for v in np.argwhere(dup)[0])
            raise TraceValidationError("expert_ids", f"{K} distinct ids in each row",
                                       f"{ids[tok, layer].tolist()} at [token {tok}, layer {layer}]")
    if t.topk_order == "sorted" and K > 1 and T:
        if (np.diff(ids.astype(np.int32), axis=-1) < 0).any():
            raise TraceValidationError("expert_ids", "ascending ids within each row (topk_order="
                                       "'sorted')", "a row out of order")
