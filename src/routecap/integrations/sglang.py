"""SGLang: adapters for ``meta_info["routed_experts"]``.

Shape legend: T tokens, A all decoder layers, L MoE layers, K top-k.

SGLang (``--enable-return-routed-experts``, per request ``return_routed_experts: true``) returns
``meta_info["routed_experts"]``: standard base64 (with padding) of the raw little-endian int32
bytes of a C-order ``[T, A, K]`` array, no header and no shape; dense layers are zero rows. With
``routed_experts_start_len = s`` the rows cover positions ``[s, prompt + completion - 1)``. About
60 MB per 32k-token sample at 48 layers x top-8: routecap's codec carries the same in ~8 MB.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..trace import RoutingTrace
from .vllm import from_vllm, to_vllm

__all__ = ["from_sglang", "to_sglang"]


def from_sglang(meta_info: Mapping[str, Any] | str, *, num_layers: int, top_k: int,
                moe_layers: Sequence[int], num_experts: int, request_id: str | None = None,
                prompt_len: int | None = None, start: int | None = None, model: str = "",
                token_ids: Sequence[int] | None = None) -> RoutingTrace:
    """A trace from SGLang's ``meta_info`` (or the ``routed_experts`` string alone).

    ``num_layers`` (A) and ``top_k`` give the array's shape, which the wire format omits.
    ``prompt_len`` and ``start`` default to ``meta_info["prompt_tokens"]`` and
    ``meta_info["routed_experts_start_len"]`` (0), ``request_id`` to ``meta_info["id"]``.
    """
    meta: Mapping[str, Any] = {"routed_experts": meta_info} if isinstance(meta_info, str) \
        else meta_info
    data = meta.get("routed_experts")
    if not isinstance(data, str):
        raise ValueError(f"from_sglang: expected meta_info['routed_experts'] to be a base64 "
                         f"string, got {type(data).__name__}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"from_sglang: routed_experts is not valid base64 ({e})") from None
    row = num_layers * top_k * 4
    if num_layers < 1 or top_k < 1 or len(raw) % row:
        raise ValueError(f"from_sglang: {len(raw)} bytes are not whole rows of {num_layers} "
                         f"layers x top-{top_k} int32 ({row} bytes per token)")
    arr = np.frombuffer(raw, "<i4").reshape(-1, num_layers, top_k)
    s = int(meta.get("routed_experts_start_len", 0) if start is None else start)
    P = meta.get("prompt_tokens") if prompt_len is None else prompt_len
    if not isinstance(P, int):
        raise ValueError("from_sglang: give prompt_len (meta_info has no 'prompt_tokens')")
    done = meta.get("completion_tokens")
    if isinstance(done, int) and arr.shape[0] != max(0, P + done - 1 - s):
        raise ValueError(f"from_sglang: {arr.shape[0]} rows, but prompt {P} + completion {done} "
                         f"- 1 - start {s} = {P + done - 1 - s}")
    rid = request_id if request_id is not None else str(meta.get("id", ""))
    t = from_vllm(arr, moe_layers=moe_layers, num_experts=num_experts, request_id=rid,
                  prompt_len=P, start=s, model=model, token_ids=token_ids)
    extra = dict(t.extra)
    extra["sglang"] = extra.pop("vllm")
    from dataclasses import replace

    return replace(t, extra=extra)


def to_sglang(trace: RoutingTrace, *, num_layers: int | None = None) -> str:
    """SGLang's ``routed_experts`` string for a trace (positions ``[trace.start, trace.end)``)."""
    from dataclasses import replace

    rec = trace.extra.get("sglang")
    t = replace(trace, extra={**trace.extra, "vllm": rec}) if isinstance(rec, dict) else trace
    arr = to_vllm(t, num_layers=num_layers, dtype="<i4")
    return base64.b64encode(arr.tobytes()).decode("ascii")
