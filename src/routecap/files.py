"""Trace files: ``save_file`` / ``load_file`` for a list of traces, and a sharded streaming writer.

A trace file is a `safetensors <https://github.com/huggingface/safetensors>`_ file, readable by any
safetensors reader, holding the traces of one model (same E, K, ``moe_layers``, dtype, top-k
order): every request's rows concatenated into one ``expert_ids`` tensor ``[N, L, K]``, optional
per-request ``missing.{i}`` masks ``[T_i, L]`` (only for requests that have missing routes), optional
``token_ids`` ``[N']`` for the requests that carry tokens, and a JSON header in the safetensors
metadata (``routecap`` key) with the shared fields, one record per request and a CRC-32 of every
tensor. docs/trace-format.md is the normative description.

Reads are memory-mapped: the arrays of a loaded trace are read-only views of the file, not copies.
Writes go to a temporary file in the same folder, are flushed to disk and then renamed, so a reader
never sees half a file. A trace folder holds shards ``{prefix}-{n:05d}.safetensors`` and an index
``{prefix}.index.json`` rewritten (atomically) after every shard: a writer killed mid-way leaves
every finished shard listed and readable, and a shard finished after the last index update is
found by its name and read too.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .trace import FORMAT_VERSION, RoutingTrace, TraceValidationError, id_dtype_for

__all__ = [
    "FILE_FORMAT",
    "INDEX_FORMAT",
    "TraceFileError",
    "TraceSet",
    "TraceWriter",
    "load_file",
    "open_traces",
    "read_header",
    "save_file",
]

FILE_FORMAT = "routecap.trace"
INDEX_FORMAT = "routecap.trace-index"
SHARD_SUFFIX = ".safetensors"
INDEX_SUFFIX = ".index.json"
_MAX_HEADER = 100 * 1024 * 1024
_ST_DTYPES = {"U8": np.uint8, "U16": np.uint16, "I32": np.int32, "BOOL": np.bool_}
_SHARED = ("model", "num_experts", "top_k", "moe_layers", "dtype", "topk_order")


class TraceFileError(ValueError):
    """A trace file or folder is missing, truncated, corrupt, or of an unsupported version."""


# ---- the header -------------------------------------------------------------------------------
def _shared_fields(trace: RoutingTrace) -> dict[str, Any]:
    return {
        "model": trace.model,
        "num_experts": trace.num_experts,
        "top_k": trace.top_k,
        "moe_layers": list(trace.moe_layers),
        "dtype": trace.dtype.name,
        "topk_order": trace.topk_order,
    }


def _check_same(shared: dict[str, Any], trace: RoutingTrace, where: str) -> None:
    mine = _shared_fields(trace)
    for key in _SHARED:
        if mine[key] != shared[key]:
            raise TraceValidationError(
                key, f"{shared[key]!r} (as in the first trace of {where})",
                f"{mine[key]!r} in request {trace.request_id!r}",
                hint="one trace file holds traces of one model; write other models to another file",
            )


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(a)).cast("B")) & 0xFFFFFFFF


_umask = os.umask(0o022)
os.umask(_umask)
_FILE_MODE = 0o666 & ~_umask
_NP_TO_ST = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def _serialize(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> list[bytes | memoryview]:
    """The safetensors layout, byte-deterministic: sorted JSON keys, tensors by (itemsize desc,
    name), header padded with spaces to 8 bytes so every tensor is aligned to its itemsize.

    NOTE: safetensors' own writer keeps metadata in a hash map whose order varies between calls,
    so the same traces would not always give the same bytes; hence this writer.
    """
    order = sorted(tensors, key=lambda k: (-tensors[k].dtype.itemsize, k))
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    pos = 0
    for name in order:
        a = tensors[name]
        header[name] = {"dtype": _NP_TO_ST[a.dtype], "shape": list(a.shape),
                        "data_offsets": [pos, pos + a.nbytes]}
        pos += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    chunks: list[bytes | memoryview] = [len(raw).to_bytes(8, "little"), raw]
    chunks += [memoryview(np.ascontiguousarray(tensors[n])).cast("B") for n in order]
    return chunks


def _encode(traces: Sequence[RoutingTrace]) -> list[bytes | memoryview]:
    if not traces:
        raise TraceValidationError("traces", "at least one trace", "an empty list",
                                   hint="a trace file records one model; with no trace there is "
                                   "no model to record")
    shared = _shared_fields(traces[0])
    seen: set[str] = set()
    records = []
    tensors: dict[str, np.ndarray] = {}
    tokens = []
    for i, t in enumerate(traces):
        if not isinstance(t, RoutingTrace):
            raise TraceValidationError(f"traces[{i}]", "a RoutingTrace", type(t).__name__)
        _check_same(shared, t, "this file")
        if t.request_id in seen:
            raise TraceValidationError("request_id", "unique request ids within a file",
                                       f"{t.request_id!r} twice")
        seen.add(t.request_id)
        if t.missing is not None:
            tensors[f"missing.{i}"] = np.ascontiguousarray(t.missing)
        if t.token_ids is not None:
            tokens.append(t.token_ids)
        records.append({
            "request_id": t.request_id,
            "start": t.start,
            "prompt_len": t.prompt_len,
            "num_tokens": t.num_tokens,
            "missing": t.missing is not None,
            "tokens": t.token_ids is not None,
            "extra": t.extra,
        })
    tensors["expert_ids"] = np.ascontiguousarray(
        np.concatenate([t.expert_ids for t in traces], axis=0))
    if tokens:
        tensors["token_ids"] = np.ascontiguousarray(np.concatenate(tokens).astype(np.int32))
    header = {**shared, "requests": records,
              "crc32": {name: _crc(a) for name, a in sorted(tensors.items())}}
    meta = {"format": FILE_FORMAT, "format_version": str(FORMAT_VERSION),
            "routecap": json.dumps(header, separators=(",", ":"), sort_keys=True)}
    return _serialize(tensors, meta)


def _atomic_write(path: Path, data: str | list[bytes | memoryview]) -> int:
    """Write to a temporary file in the same folder, fsync, rename. Returns the bytes written."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    size = 0
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in [data.encode()] if isinstance(data, str) else data:
                f.write(chunk)
                size += len(chunk) if isinstance(chunk, bytes) else chunk.nbytes
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return size


def save_file(traces: Sequence[RoutingTrace], path: str | os.PathLike) -> None:
    """Write traces of one model to ``path`` (atomically: temporary file, then rename).

    Example:
        >>> import numpy as np, tempfile, os
        >>> t = RoutingTrace.from_ids(np.zeros((3, 1, 1), int), num_experts=4, moe_layers=[0],
        ...                           request_id="a", prompt_len=3)
        >>> p = os.path.join(tempfile.mkdtemp(), "t.safetensors")
        >>> save_file([t], p); load_file(p)[0].equals(t)
        True
    """
    _atomic_write(Path(path), _encode(list(traces)))


@dataclass(frozen=True)
class _Header:
    header_len: int
    tensors: dict[str, dict[str, Any]]
    routecap: dict[str, Any]
    file_size: int


def _fail(path: Path, what: str) -> TraceFileError:
    return TraceFileError(f"{path}: {what}")


def read_header(path: str | os.PathLike) -> _Header:
    """Parse and check the header of a trace file without reading its data."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _fail(path, f"truncated: {size} bytes is too short for a trace file "
                            "(expected an 8-byte header length first)")
            n = int.from_bytes(head, "little")
            if n < 2 or n > _MAX_HEADER or n > size - 8:
                raise _fail(path, f"corrupt or truncated: the header length says {n} bytes but the "
                            f"file has {size - 8} bytes after it")
            raw = f.read(n)
    except FileNotFoundError:
        raise TraceFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise TraceFileError(f"{path}: is a folder; use open_traces() for trace folders") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"corrupt header (not JSON: {e})") from None
    if not isinstance(header, dict):
        raise _fail(path, "corrupt header (expected a JSON object)")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or meta.get("format") != FILE_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise _fail(path, f"not a routecap trace file (expected metadata format={FILE_FORMAT!r}, "
                    f"got {got!r})")
    version = meta.get("format_version")
    if version != str(FORMAT_VERSION):
        if isinstance(version, str) and version.isdigit() and int(version) > FORMAT_VERSION:
            raise _fail(path, f"format version {version} is newer than this routecap reads "
                        f"({FORMAT_VERSION}); upgrade routecap")
        raise _fail(path, f"unsupported format version {version!r} (this routecap reads "
                    f"{FORMAT_VERSION})")
    try:
        rc = json.loads(meta["routecap"])
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise _fail(path, f"corrupt routecap header ({type(e).__name__}: {e})") from None
    if not isinstance(rc, dict):
        raise _fail(path, "corrupt routecap header (expected a JSON object)")
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        try:
            dtype = np.dtype(_ST_DTYPES[info["dtype"]])
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _fail(path, f"corrupt header entry for tensor {name!r}: {info!r}") from None
        if any(d < 0 for d in shape) or end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise _fail(path, f"corrupt header: tensor {name!r} of shape {shape} and dtype "
                        f"{dtype} cannot span bytes [{begin}, {end})")
        spans.append((begin, end, name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise _fail(path, f"corrupt header: tensor {name!r} starts at byte {begin}, "
                        f"expected {pos}")
        pos = end
    if pos != data_len:
        kind = "truncated" if data_len < pos else "corrupt"
        raise _fail(path, f"{kind}: the header describes {pos} bytes of data, the file holds "
                    f"{data_len}")
    return _Header(header_len=n, tensors=header, routecap=rc, file_size=size)


def _open_arrays(path: Path, h: _Header) -> dict[str, np.ndarray]:
    data_len = h.file_size - 8 - h.header_len
    if data_len == 0:
        mm = np.zeros(0, np.uint8)
    else:
        mm = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + h.header_len, shape=(data_len,))
    out = {}
    for name, info in h.tensors.items():
        begin, end = info["data_offsets"]
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        out[name] = mm[begin:end].view(dtype).reshape(info["shape"])
    return out


def _get(rc: dict[str, Any], key: str, kind: type | tuple[type, ...], path: Path) -> Any:
    v = rc.get(key)
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
        raise _fail(path, f"corrupt routecap header: {key!r} should be {kind}, got {v!r}")
    return v


def load_file(path: str | os.PathLike, *, verify: bool = True) -> list[RoutingTrace]:
    """Read every trace of a file (memory-mapped; the arrays are read-only views).

    ``verify`` checks each tensor's CRC-32 (reads all the data once) and validates every trace;
    without it only the structure is checked and data is read lazily.
    """
    path = Path(path)
    h = read_header(path)
    rc = h.routecap
    arrays = _open_arrays(path, h)
    if verify:
        crcs = _get(rc, "crc32", dict, path)
        for name, a in arrays.items():
            if crcs.get(name) != _crc(a):
                raise _fail(path, f"corrupt data: checksum mismatch in tensor {name!r}")
    try:
        E = _get(rc, "num_experts", int, path)
        K = _get(rc, "top_k", int, path)
        layers = tuple(_get(rc, "moe_layers", list, path))
        requests = _get(rc, "requests", list, path)
        model = _get(rc, "model", str, path)
        order = _get(rc, "topk_order", str, path)
        dtype = _get(rc, "dtype", str, path)
        expect_dtype = id_dtype_for(E)
    except TraceValidationError as e:
        raise _fail(path, f"corrupt routecap header: {e}") from None
    if dtype != expect_dtype.name:
        raise _fail(path, f"corrupt routecap header: dtype {dtype!r} but num_experts={E} needs "
                    f"{expect_dtype.name}")
    ids = arrays.get("expert_ids")
    if ids is None or ids.dtype != expect_dtype or ids.ndim != 3 or ids.shape[1:] != (len(layers), K):
        raise _fail(path, f"corrupt file: expected tensor 'expert_ids' of [N, {len(layers)}, {K}] "
                    f"{expect_dtype.name}, got {None if ids is None else (ids.shape, ids.dtype)}")
    tokens = arrays.get("token_ids")
    traces: list[RoutingTrace] = []
    row = tok_row = 0
    for i, r in enumerate(requests):
        try:
            T = int(r["num_tokens"])
            miss = arrays.get(f"missing.{i}") if r["missing"] else None
            if r["missing"] and miss is None:
                raise KeyError(f"missing.{i}")
            tok = None
            if r["tokens"]:
                if tokens is None:
                    raise KeyError("token_ids")
                tok = tokens[tok_row:tok_row + T]
                tok_row += T
            if row + T > ids.shape[0] or (tok is not None and tok.shape[0] != T):
                raise ValueError(f"request {i} needs rows [{row}, {row + T}) of {ids.shape[0]}")
            t = RoutingTrace(
                expert_ids=ids[row:row + T], missing=miss, token_ids=tok, num_experts=E,
                moe_layers=layers, request_id=r["request_id"], prompt_len=r["prompt_len"],
                start=r["start"], model=model, topk_order=order, extra=r.get("extra", {}),
            ) if verify else _unchecked_trace(
                expert_ids=ids[row:row + T], missing=miss, token_ids=tok, num_experts=E,
                moe_layers=layers, request_id=r["request_id"], prompt_len=r["prompt_len"],
                start=r["start"], model=model, topk_order=order, extra=r.get("extra", {}))
        except TraceValidationError as e:
            raise _fail(path, f"request {i} breaks the trace contract: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise _fail(path, f"corrupt routecap header for request {i}: "
                        f"{type(e).__name__}: {e}") from None
        row += T
        traces.append(t)
    if row != ids.shape[0]:
        raise _fail(path, f"corrupt file: requests cover {row} rows, expert_ids has {ids.shape[0]}")
    return traces


def _unchecked_trace(**fields: Any) -> RoutingTrace:
    t = object.__new__(RoutingTrace)
    for k, v in fields.items():
        object.__setattr__(t, k, tuple(v) if k == "moe_layers" else v)
    object.__setattr__(t, "format_version", FORMAT_VERSION)
    return t


# ---- sharded folders --------------------------------------------------------------------------
_SHARD_RE = re.compile(r"^(?P<prefix>[A-Za-z0-9_.-]+?)-(?P<num>\d{5,})\.safetensors$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class TraceWriter:
    """Append traces to a folder of shards: one shard per ``max_requests`` or ``max_bytes``.

    Every finished shard is on disk and listed in ``{prefix}.index.json`` before ``append`` returns;
    a writer killed mid-way loses only the traces not yet in a shard. Use ``prefix`` to let several
    writers (e.g. data-parallel ranks) share one folder.

    Example:
        >>> import numpy as np, tempfile
        >>> d = tempfile.mkdtemp()
        >>> with TraceWriter(d, max_requests=2) as w:
        ...     for i in range(5):
        ...         w.append(RoutingTrace.from_ids(np.zeros((2, 1, 1), int), num_experts=4,
        ...                  moe_layers=[0], request_id=str(i), prompt_len=2))
        >>> len(open_traces(d)), len(w.shards)
        (5, 3)
    """

    def __init__(self, folder: str | os.PathLike, *, prefix: str = "traces",
                 max_requests: int = 1024, max_bytes: int = 256 << 20,
                 overwrite: bool = False) -> None:
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"TraceWriter: prefix must match {_PREFIX_RE.pattern}, got {prefix!r}")
        if max_requests < 1 or max_bytes < 1:
            raise ValueError(f"TraceWriter: expected max_requests >= 1 and max_bytes >= 1, got "
                             f"{max_requests}, {max_bytes}")
        self.folder = Path(folder)
        self.prefix = prefix
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        existing = self._existing()
        if existing:
            if not overwrite:
                raise FileExistsError(
                    f"{self.folder} already holds traces with prefix {prefix!r} "
                    f"({existing[0].name}, ...); choose another folder or prefix, or overwrite"
                )
            for p in existing:
                p.unlink()
        self.shards: list[dict[str, Any]] = []
        self._buffer: list[RoutingTrace] = []
        self._buffer_bytes = 0
        self._shared: dict[str, Any] | None = None
        self._ids: set[str] = set()
        self.closed = False

    def _existing(self) -> list[Path]:
        out = [self.folder / f"{self.prefix}{INDEX_SUFFIX}"]
        out = [p for p in out if p.exists()]
        for p in sorted(self.folder.glob(f"{self.prefix}-*{SHARD_SUFFIX}")):
            m = _SHARD_RE.match(p.name)
            if m and m["prefix"] == self.prefix:
                out.append(p)
        return out

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        # finished traces in the buffer are valid: write them even if the block raised, but only
        # a clean exit marks the index complete
        self.close(complete=exc[0] is None)

    def append(self, trace: RoutingTrace) -> None:
        if self.closed:
            raise ValueError("TraceWriter: append() after close()")
        if not isinstance(trace, RoutingTrace):
            raise TypeError(f"TraceWriter.append: expected a RoutingTrace, got {type(trace).__name__}")
        if self._shared is None:
            self._shared = _shared_fields(trace)
        else:
            _check_same(self._shared, trace, f"{self.folder}/{self.prefix}")
        if trace.request_id in self._ids:
            raise TraceValidationError("request_id", "unique request ids within a writer",
                                       f"{trace.request_id!r} twice")
        self._ids.add(trace.request_id)
        self._buffer.append(trace)
        self._buffer_bytes += trace.nbytes
        if len(self._buffer) >= self.max_requests or self._buffer_bytes >= self.max_bytes:
            self.flush()

    def extend(self, traces: Iterable[RoutingTrace]) -> None:
        for t in traces:
            self.append(t)

    def flush(self) -> None:
        """Write the buffered traces as one shard (if any) and update the index."""
        if not self._buffer:
            return
        name = f"{self.prefix}-{len(self.shards):05d}{SHARD_SUFFIX}"
        size = _atomic_write(self.folder / name, _encode(self._buffer))
        self.shards.append({
            "file": name,
            "num_requests": len(self._buffer),
            "num_tokens": sum(t.num_tokens for t in self._buffer),
            "bytes": size,
            "request_ids": [t.request_id for t in self._buffer],
        })
        self._buffer = []
        self._buffer_bytes = 0
        self._write_index(complete=False)

    def _write_index(self, *, complete: bool) -> None:
        index = {
            "format": INDEX_FORMAT,
            "format_version": FORMAT_VERSION,
            "prefix": self.prefix,
            **(self._shared or {}),
            "complete": complete,
            "num_requests": sum(s["num_requests"] for s in self.shards),
            "num_tokens": sum(s["num_tokens"] for s in self.shards),
            "shards": self.shards,
        }
        _atomic_write(self.folder / f"{self.prefix}{INDEX_SUFFIX}", json.dumps(index, indent=1))

    def close(self, *, complete: bool = True) -> None:
        if self.closed:
            return
        self.flush()
        self.closed = True
        if self.shards:
            self._write_index(complete=complete)


class TraceSet:
    """The traces of a folder (every prefix's shards) or of one file, read lazily shard by shard."""

    def __init__(self, shards: list[Path], *, verify: bool = True, complete: bool = True) -> None:
        self.shards = shards
        self.verify = verify
        self.complete = complete  # False if a writer did not finish (or no index was found)
        self._headers = [read_header(p) for p in shards]
        shared = None
        for p, h in zip(shards, self._headers):
            mine = {k: h.routecap.get(k) for k in _SHARED}
            if shared is None:
                shared = mine
            elif mine != shared:
                diff = [k for k in _SHARED if mine[k] != shared[k]]
                raise TraceFileError(f"{p}: holds traces of another model than {shards[0]} "
                                     f"(differs in {diff})")
        self.shared: dict[str, Any] = shared or {}

    def __len__(self) -> int:
        return sum(len(h.routecap.get("requests", [])) for h in self._headers)

    @property
    def num_tokens(self) -> int:
        return sum(int(r.get("num_tokens", 0)) for h in self._headers
                   for r in h.routecap.get("requests", []))

    def request_ids(self) -> list[str]:
        return [r["request_id"] for h in self._headers for r in h.routecap.get("requests", [])]

    def __iter__(self) -> Iterator[RoutingTrace]:
        for p in self.shards:
            yield from load_file(p, verify=self.verify)

    def get(self, request_id: str) -> RoutingTrace:
        """The trace of one request (reads only the shard that holds it)."""
        for p, h in zip(self.shards, self._headers):
            if any(r.get("request_id") == request_id for r in h.routecap.get("requests", [])):
                for t in load_file(p, verify=self.verify):
                    if t.request_id == request_id:
                        return t
        raise KeyError(f"request {request_id!r} is not in these traces ({len(self)} requests)")


def open_traces(path: str | os.PathLike, *, verify: bool = True) -> TraceSet:
    """Open a trace file or a folder of shards (every index in it, plus shards no index lists)."""
    path = Path(path)
    if not path.exists():
        raise TraceFileError(f"{path}: no such file or folder")
    if path.is_file():
        return TraceSet([path], verify=verify)
    shards: list[Path] = []
    listed: set[str] = set()
    complete = True
    indexes = sorted(path.glob(f"*{INDEX_SUFFIX}"))
    for ip in indexes:
        try:
            index = json.loads(ip.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TraceFileError(f"{ip}: corrupt index ({e}); delete it to read the shards "
                                 "by their names") from None
        if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
            raise TraceFileError(f"{ip}: not a routecap trace index (expected format "
                                 f"{INDEX_FORMAT!r})")
        if index.get("format_version") != FORMAT_VERSION:
            raise TraceFileError(f"{ip}: unsupported index format version "
                                 f"{index.get('format_version')!r} (this routecap reads "
                                 f"{FORMAT_VERSION})")
        complete &= bool(index.get("complete"))
        for s in index.get("shards", []):
            f = path / str(s.get("file"))
            if not f.exists():
                raise TraceFileError(f"{ip}: lists shard {f.name}, which is missing")
            shards.append(f)
            listed.add(f.name)
    for p in sorted(path.glob(f"*{SHARD_SUFFIX}")):
        if p.name not in listed and _SHARD_RE.match(p.name):
            shards.append(p)  # finished after the last index update (writer killed) or no index
            complete = False
    if not shards:
        raise TraceFileError(f"{path}: no trace shards (*{SHARD_SUFFIX}) in this folder")
    return TraceSet(shards, verify=verify, complete=complete and bool(indexes))

