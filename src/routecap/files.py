"""Trace files: ``save_file`` / ``load_file`` for a list of traces (one model per file).

A trace file is a `safetensors <https://github.com/huggingface/safetensors>`_ file, readable by any
safetensors reader, holding the traces of one model (same E, K, ``moe_layers``, dtype, top-k
order): every request's rows concatenated into one ``expert_ids`` tensor ``[N, L, K]``, optional
per-request ``missing.{i}`` masks ``[T_i, L]`` (only for requests that have missing routes), optional
``token_ids`` ``[N']`` for the requests that carry tokens, and a JSON header in the safetensors
metadata (``routecap`` key) with the shared fields, one record per request, a CRC-32 of every
tensor and (file format 2) a CRC-32 of the header itself. docs/trace-format.md is the normative
description. Folders of shards (manifest, lock, atomic commit, resume) live in the package
:mod:`routecap.tracefolder`; ``TraceSet``, ``TraceWriter`` and ``open_traces`` are re-exported here.

Reads are memory-mapped: the arrays of a loaded trace are read-only views of the file, not copies.
Writes go to a temporary file in the same folder, are flushed to disk and then renamed, so a reader
never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .trace import RoutingTrace, TraceValidationError, id_dtype_for

if TYPE_CHECKING:  # re-exported at run time by __getattr__ (at the end)
    from .tracefolder import TraceSet, TraceWriter, open_traces

__all__ = [
    "FILE_FORMAT",
    "FILE_FORMAT_VERSION",
    "TraceFileError",
    "TraceSet",
    "TraceWriter",
    "load_file",
    "open_traces",
    "read_header",
    "save_file",
]

FILE_FORMAT = "routecap.trace"
# 1: the first layout; 2: the same plus ``header_crc32`` (a CRC-32 of the routecap header).
# Both are read; version 2 is written.
FILE_FORMAT_VERSION = 2
_READABLE_VERSIONS = ("1", "2")
SHARD_SUFFIX = ".safetensors"
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


def _bytes_of(a: np.ndarray) -> memoryview:
    """The bytes of ``a`` without a copy (also for zero-size arrays, which
    ``memoryview.cast`` refuses)."""
    return memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(_bytes_of(a)) & 0xFFFFFFFF


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
    chunks += [_bytes_of(tensors[n]) for n in order]
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
    header["header_crc32"] = _header_crc(header)
    meta = {"format": FILE_FORMAT, "format_version": str(FILE_FORMAT_VERSION),
            "routecap": json.dumps(header, separators=(",", ":"), sort_keys=True)}
    return _serialize(tensors, meta)


def _header_crc(header: dict[str, Any]) -> int:
    """CRC-32 of the routecap header without its ``header_crc32`` key, in canonical JSON."""
    body = {k: v for k, v in header.items() if k != "header_crc32"}
    return zlib.crc32(json.dumps(body, separators=(",", ":"), sort_keys=True).encode()) & 0xFFFFFFFF


TMP_SUFFIX = ".tmp"


def _open_temp(path: Path) -> tuple[int, Path]:
    """A new file ``.{name}.{random}.tmp`` beside ``path``, mode 0666 less the umask.

    NOTE: ``os.open`` lets the kernel apply the umask; ``tempfile.mkstemp`` makes 0600 files and
    reading the umask needs ``os.umask``, which sets it too (process-global, racy with threads).
    """
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{TMP_SUFFIX}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), tmp
        except FileExistsError:
            continue


def fsync_folder(folder: Path) -> None:
    """Make renames and unlinks in ``folder`` durable (best effort: some file systems refuse)."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


@dataclass(frozen=True)
class Written:
    size: int
    sha256: str


def _atomic_write(path: Path, data: str | bytes | Sequence[bytes | memoryview]) -> Written:
    """Write to a temporary file in the same folder, fsync, rename; nothing is left behind on an
    error. Returns the size and SHA-256 of what was written (hashed on the way, not re-read)."""
    path = Path(path)
    fd, tmp = _open_temp(path)
    size = 0
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, str):
                data = [data.encode()]
            elif isinstance(data, bytes):
                data = [data]
            for chunk in data:
                f.write(chunk)
                digest.update(chunk)
                size += len(chunk) if isinstance(chunk, bytes) else chunk.nbytes
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_folder(path.parent)
    return Written(size=size, sha256=digest.hexdigest())


class AtomicTextWriter:
    """A text file written line by line to a temporary file and renamed over ``path`` by
    ``commit()``; ``abort()`` (or leaving the ``with`` block on an exception) removes it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        fd, self.tmp = _open_temp(self.path)
        self._f = os.fdopen(fd, "w", encoding="utf-8")

    def write(self, text: str) -> None:
        self._f.write(text)

    def commit(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        fsync_folder(self.path.parent)

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        try:
            os.unlink(self.tmp)
        except OSError:
            pass

    def __enter__(self) -> AtomicTextWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is not None or not self._f.closed:
            self.abort()


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
    if version not in _READABLE_VERSIONS:
        if isinstance(version, str) and version.isdigit() and int(version) > FILE_FORMAT_VERSION:
            raise _fail(path, f"format version {version} is newer than this routecap reads "
                        f"({FILE_FORMAT_VERSION}); upgrade routecap")
        raise _fail(path, f"unsupported format version {version!r} (this routecap reads "
                    f"{', '.join(_READABLE_VERSIONS)})")
    try:
        rc = json.loads(meta["routecap"])
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise _fail(path, f"corrupt routecap header ({type(e).__name__}: {e})") from None
    if not isinstance(rc, dict):
        raise _fail(path, "corrupt routecap header (expected a JSON object)")
    if "header_crc32" in rc or version != "1":  # version 1 files have no header checksum
        if rc.get("header_crc32") != _header_crc(rc):
            raise _fail(path, "corrupt routecap header: its checksum (header_crc32) does not "
                        "match")
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
    return load_parsed(path, read_header(path), check_crc=verify, validate=verify)


def load_parsed(path: Path, h: _Header, *, check_crc: bool, validate: bool) -> list[RoutingTrace]:
    """The traces of a file whose header ``h`` was read by :func:`read_header`.

    ``check_crc`` reads all the data once to check each tensor's CRC-32; ``validate`` checks every
    trace against the contract. A reader that has verified the whole file's bytes against a
    manifest hash (as trace folders do) needs neither.
    """
    rc = h.routecap
    arrays = _open_arrays(path, h)
    if check_crc:
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
            ) if validate else RoutingTrace.from_verified(
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


_FOLDER_API = ("TraceSet", "TraceWriter", "open_traces")


def __getattr__(name: str) -> Any:
    # NOTE: the folder API (manifest, lock, atomic commit, resume) lives in routecap.tracefolder,
    # which builds on this module: it is re-exported lazily so either module can be imported first
    if name in _FOLDER_API:
        from . import tracefolder

        return getattr(tracefolder, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
