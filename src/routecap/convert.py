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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import codec
from .files import AtomicTextWriter, TraceWriter, open_traces
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


def _int(rec: dict[str, Any], key: str, *, default: int | None = None) -> int:
    """A non-negative integer field, exactly (3.7 is not 3, 1e30 is not a position)."""
    v = rec.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 1 << 62:
        raise ConvertError(f"field {key!r}: expected a non-negative integer, got {v!r}")
    return v


def _request_id(rec: dict[str, Any], key: str, default: str) -> str:
    if key not in rec:
        return default
    v = rec[key]
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise ConvertError(f"field {key!r}: expected a string (or integer) request id, got {v!r}")
    return str(v)


def _check_shape(t: RoutingTrace, s: RouterShape) -> RoutingTrace:
    if t.top_k != s.top_k:
        raise ConvertError(f"the record has K={t.top_k} experts per token, the router shape "
                           f"says top-k {s.top_k}")
    return t


def _record_trace(rec: dict[str, Any], n: int, fmt: str, shape: RouterShape | None
                  ) -> RoutingTrace:
    from .integrations.sglang import from_sglang
    from .integrations.vllm import from_vllm_b64npy

    if fmt == "wire":
        data = rec["routecap"]
        if not isinstance(data, str):
            raise ConvertError(f"field 'routecap': expected a base64 string, got "
                               f"{type(data).__name__}")
        return codec.decode(base64.b64decode(data, validate=True))
    s = _need(shape, fmt)
    if fmt == "sglang":
        P = _int(rec, "prompt_tokens")
        start = _int(rec, "routed_experts_start_len", default=0)
        done = rec.get("completion_tokens", 0)  # only checked against the rows by from_sglang
        if isinstance(done, bool) or not isinstance(done, int):
            raise ConvertError(f"field 'completion_tokens': expected an integer, got {done!r}")
        t = from_sglang(rec, num_layers=s.num_layers, top_k=s.top_k, moe_layers=s.moe_layers,
                        num_experts=s.num_experts, model=s.model, prompt_len=P, start=start,
                        request_id=_request_id(rec, "id", str(n - 1)))
        return _check_shape(t, s)
    t = from_vllm_b64npy(rec["routed_experts"], moe_layers=s.moe_layers, num_experts=s.num_experts,
                         request_id=_request_id(rec, "request_id", str(n - 1)),
                         prompt_len=_int(rec, "prompt_len"), start=_int(rec, "start", default=0),
                         model=s.model)
    return _check_shape(t, s)


def read_records(path: Path, fmt: str, shape: RouterShape | None = None
                 ) -> Iterator[RoutingTrace]:
    """Traces from ``path`` in format ``fmt``."""
    if fmt not in FORMATS:
        raise ConvertError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if fmt == "trace":
        yield from open_traces(path)
        return
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    n_records = 0
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
                t = _record_trace(rec, n, fmt, shape)
            except ConvertError as e:
                raise ConvertError(f"{where}: {e}") from None
            except (KeyError, TypeError, ValueError, IndexError) as e:
                raise ConvertError(f"{where}: cannot read a {fmt} record "
                                   f"({type(e).__name__}: {e})") from None
            n_records += 1
            yield t
    if not n_records:
        raise ConvertError(f"{path}: holds no {fmt} record")


def _record(t: RoutingTrace, fmt: str, shape: RouterShape | None,
            wire_mode: str = "auto") -> dict[str, Any]:
    from .integrations.sglang import to_sglang
    from .integrations.vllm import to_vllm_b64npy

    A = shape.num_layers if shape is not None else None
    if fmt == "wire":
        if wire_mode in codec.SET_MODES:  # asking for a set mode says the order may go
            t = t.with_sorted_topk()
        return {"request_id": t.request_id, "routecap": base64.b64encode(
            codec.encode(t, mode=wire_mode)).decode("ascii")}
    if fmt == "sglang":
        return {"id": t.request_id, "routed_experts": to_sglang(t, num_layers=A),
                "routed_experts_start_len": t.start, "prompt_tokens": t.prompt_len,
                "completion_tokens": t.end + 1 - t.prompt_len}
    if fmt == "vllm":
        return {"request_id": t.request_id, "routed_experts": to_vllm_b64npy(t, num_layers=A),
                "prompt_len": t.prompt_len, "start": t.start}
    raise ConvertError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def write_records(traces: Iterable[RoutingTrace], path: Path, fmt: str,
                  shape: RouterShape | None = None, *, overwrite: bool = False,
                  on_trace: Callable[[], None] | None = None, wire_mode: str = "auto") -> int:
    """Write traces in format ``fmt``, all or nothing: a trace folder is committed, a JSONL file
    renamed into place, only once every trace is written; an error leaves ``path`` as it was.
    ``wire_mode``: the codec mode of ``wire`` records (:func:`routecap.codec.encode`; ``set`` and
    ``entropy`` store each row as a set, dropping the router's order). Returns how many."""
    _check_wire_mode(fmt, wire_mode)
    n = 0
    if fmt == "trace":
        with TraceWriter(path, overwrite=overwrite, keep_on_error=False) as w:
            for t in traces:
                w.append(t)
                n += 1
                if on_trace is not None:
                    on_trace()
        return n
    if fmt not in FORMATS:
        raise ConvertError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if path.is_dir():
        raise ConvertError(f"{path}: is a folder; {fmt} output is one JSONL file")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists")
    with AtomicTextWriter(path) as f:
        for t in traces:
            f.write(json.dumps(_record(t, fmt, shape, wire_mode), separators=(",", ":"))
                    + "\n")
            n += 1
            if on_trace is not None:
                on_trace()
        f.commit()
    return n


def _check_wire_mode(fmt: str, wire_mode: str) -> None:
    if wire_mode not in codec.MODES:
        raise ConvertError(f"unknown wire mode {wire_mode!r}; expected one of {codec.MODES}")
    if wire_mode != "auto" and fmt != "wire":
        raise ConvertError(f"a wire mode ({wire_mode!r}) applies to wire output only, not {fmt}")


def _same_or_nested(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def convert(src: Path, dst: Path, *, src_format: str, dst_format: str,
            shape: RouterShape | None = None, overwrite: bool = False,
            on_trace: Callable[[], None] | None = None, wire_mode: str = "auto") -> int:
    """Convert every trace of ``src`` to ``dst``; returns how many. ``dst`` is written all or
    nothing (see :func:`write_records`, which also says what ``wire_mode`` does); it may not be
    ``src`` or inside it (or hold it)."""
    for f in (src_format, dst_format):
        if f not in FORMATS:
            raise ConvertError(f"unknown format {f!r}; expected one of {FORMATS}")
    _check_wire_mode(dst_format, wire_mode)
    if _same_or_nested(Path(src), Path(dst)):
        raise ConvertError(f"the destination {dst} is the source {src} or inside it (or holds "
                           "it): convert reads while it writes; choose another destination")
    return write_records(read_records(src, src_format, shape), dst, dst_format, shape,
                         overwrite=overwrite, on_trace=on_trace, wire_mode=wire_mode)


def count_records(path: Path, fmt: str) -> int | None:
    """How many traces ``path`` holds (for a progress bar); None when it cannot tell cheaply."""
    try:
        if fmt == "trace":
            return len(open_traces(path, verify=False))
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except (OSError, ValueError):
        return None


def guess_format(path: Path) -> str:
    """``trace`` for folders and .safetensors, else the format of a JSONL file's first record."""
    if path.is_dir() or path.suffix == ".safetensors":
        return "trace"
    try:
        with open(path, encoding="utf-8") as f:
            first = next((ln for ln in f if ln.strip()), "")
        rec = json.loads(first)
    except FileNotFoundError:
        raise ConvertError(f"{path}: no such file or folder") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise ConvertError(f"{path}: cannot tell its format; give --from") from None
    if isinstance(rec, dict) and "routecap" in rec:
        return "wire"
    if isinstance(rec, dict) and ("routed_experts_start_len" in rec or "prompt_tokens" in rec):
        return "sglang"
    if isinstance(rec, dict) and "routed_experts" in rec:
        return "vllm"
    raise ConvertError(f"{path}: cannot tell its format; give --from")
