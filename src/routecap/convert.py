"""Conversion between trace files and the wire formats engines and trainers exchange.

Formats:

* ``trace``  routecap trace files: a folder of shards (or one ``.safetensors`` file);
* ``wire``   JSONL, one request per line: ``{"request_id": ..., "routecap": base64(codec bytes)}``
  (:mod:`routecap.codec`);
* ``sglang`` JSONL of SGLang ``meta_info`` objects: ``{"id", "routed_experts" (base64 int32
  [T, A, K]), "routed_experts_start_len", "prompt_tokens", "completion_tokens"}``;
* ``vllm``   JSONL: ``{"request_id", "routed_experts" (base64 of an .npy [T, A, K]),
  "prompt_len", "start"}``, as vLLM's OpenAI-compatible server returns it.

The engine formats carry all A decoder layers (dense ones as zeros) and no shape; reading them
needs the model's router shape (``RouterShape``), e.g. from its config.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import codec
from .files import TraceWriter, open_traces
from .trace import RoutingTrace

__all__ = ["FORMATS", "ConvertError", "RouterShape", "convert", "read_records", "write_records"]

FORMATS = ("trace", "wire", "sglang", "vllm")


class ConvertError(ValueError):
    """The input cannot be converted as asked; the message names the file and line."""


@dataclass(frozen=True, kw_only=True)
class RouterShape:
    """What the engine formats leave out: all layers A, which are MoE, E and K."""

    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    model: str = ""

    @classmethod
    def from_config(cls, path: str | Path) -> RouterShape:
        """From a transformers model folder or config.json (no weights needed)."""
        from transformers import AutoConfig

        from .integrations.hf_routers import UnsupportedModelError, moe_config

        p = Path(path)
        try:
            cfg = AutoConfig.from_pretrained(p.parent if p.name == "config.json" else p)
        except (OSError, ValueError) as e:
            raise ConvertError(f"--model-config {path}: cannot read a transformers config "
                               f"({e})") from None
        try:
            moe = moe_config(cfg)
        except UnsupportedModelError as e:
            raise ConvertError(f"--model-config {path}: {e}") from None
        return cls(num_layers=moe.num_layers, moe_layers=moe.moe_layers,
                   num_experts=moe.num_experts, top_k=moe.top_k,
                   model=str(getattr(cfg, "name_or_path", "") or p))


def _need(shape: RouterShape | None, fmt: str) -> RouterShape:
    if shape is None:
        raise ConvertError(f"reading {fmt} needs the model's router shape: give --model-config, "
                           "or --num-layers, --moe-layers, --num-experts and --top-k")
    return shape


def read_records(path: Path, fmt: str, shape: RouterShape | None = None
                 ) -> Iterator[RoutingTrace]:
    """Traces from ``path`` in format ``fmt``."""
    from .integrations.sglang import from_sglang
    from .integrations.vllm import from_vllm_b64npy

    if fmt == "trace":
        yield from open_traces(path)
        return
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConvertError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ConvertError(f"{where}: expected a JSON object")
            try:
                if fmt == "wire":
                    yield codec.decode(base64.b64decode(rec["routecap"], validate=True))
                elif fmt == "sglang":
                    s = _need(shape, fmt)
                    yield from_sglang(rec, num_layers=s.num_layers, top_k=s.top_k,
                                      moe_layers=s.moe_layers, num_experts=s.num_experts,
                                      model=s.model)
                elif fmt == "vllm":
                    s = _need(shape, fmt)
                    yield from_vllm_b64npy(rec["routed_experts"], moe_layers=s.moe_layers,
                                           num_experts=s.num_experts,
                                           request_id=str(rec.get("request_id", n - 1)),
                                           prompt_len=int(rec["prompt_len"]),
                                           start=int(rec.get("start", 0)), model=s.model)
                else:
                    raise ConvertError(f"unknown format {fmt!r}; expected one of {FORMATS}")
            except ConvertError:
                raise
            except (KeyError, TypeError, ValueError) as e:
                raise ConvertError(f"{where}: cannot read a {fmt} record "
                                   f"({type(e).__name__}: {e})") from None


def _record(t: RoutingTrace, fmt: str, shape: RouterShape | None) -> dict[str, Any]:
    from .integrations.sglang import to_sglang
    from .integrations.vllm import to_vllm_b64npy

    A = shape.num_layers if shape is not None else None
    if fmt == "wire":
        return {"request_id": t.request_id, "routecap": base64.b64encode(codec.encode(t))
                .decode("ascii")}
    if fmt == "sglang":
        return {"id": t.request_id, "routed_experts": to_sglang(t, num_layers=A),
                "routed_experts_start_len": t.start, "prompt_tokens": t.prompt_len,
                "completion_tokens": t.end + 1 - t.prompt_len}
    if fmt == "vllm":
        return {"request_id": t.request_id, "routed_experts": to_vllm_b64npy(t, num_layers=A),
                "prompt_len": t.prompt_len, "start": t.start}
    raise ConvertError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def write_records(traces: Sequence[RoutingTrace] | Iterator[RoutingTrace], path: Path, fmt: str,
                  shape: RouterShape | None = None, *, overwrite: bool = False) -> int:
    """Write traces in format ``fmt``; returns how many."""
    if fmt == "trace":
        n = 0
        with TraceWriter(path, overwrite=overwrite) as w:
            for t in traces:
                w.append(t)
                n += 1
        return n
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists")
    tmp = path.with_name(f".{path.name}.tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for t in traces:
            f.write(json.dumps(_record(t, fmt, shape), separators=(",", ":")) + "\n")
            n += 1
    tmp.replace(path)
    return n


def convert(src: Path, dst: Path, *, src_format: str, dst_format: str,
            shape: RouterShape | None = None, overwrite: bool = False) -> int:
    """Convert every trace of ``src`` to ``dst``; returns how many."""
    for f in (src_format, dst_format):
        if f not in FORMATS:
            raise ConvertError(f"unknown format {f!r}; expected one of {FORMATS}")
    return write_records(read_records(src, src_format, shape), dst, dst_format, shape,
                         overwrite=overwrite)


def guess_format(path: Path) -> str:
    """``trace`` for folders and .safetensors, else the format of a JSONL file's first record."""
    if path.is_dir() or path.suffix == ".safetensors":
        return "trace"
    try:
        with open(path, encoding="utf-8") as f:
            first = next((ln for ln in f if ln.strip()), "")
        rec = json.loads(first)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise ConvertError(f"{path}: cannot tell its format; give --from") from None
    if isinstance(rec, dict) and "routecap" in rec:
        return "wire"
    if isinstance(rec, dict) and ("routed_experts_start_len" in rec or "prompt_tokens" in rec):
        return "sglang"
    if isinstance(rec, dict) and "routed_experts" in rec:
        return "vllm"
    raise ConvertError(f"{path}: cannot tell its format; give --from")
