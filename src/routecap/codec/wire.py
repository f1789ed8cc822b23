"""The wire container: header, sections and token blocks around the packed rows.

See :mod:`routecap.codec` for the format. Encoding picks the smallest storage of the routes;
decoding checks every length, checksum and header field before it allocates or reads, then hands
each block to a checked kernel entry point (:mod:`routecap.codec.kernels`).
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import zstandard

from ..trace import FORMAT_VERSION, RoutingTrace, TraceValidationError, id_dtype_for
from . import entropy, entropy_kernels, kernels
from .ranking import mode_fits, token_bytes, widths_of

MAGIC = b"RCAP"
WIRE_VERSION = 1
MODES = ("auto", "order", "set", "entropy", "ids", "raw")
SET_MODES = ("set", "entropy")  # modes that store each row as a set (sorted traces only)
BLOCK_TOKENS = 16384
_MAX_HEADER = 1 << 24
_MAX_IDS = 1 << 31  # refuse to allocate more ids than this from a header


class CodecError(ValueError):
    """Data that is not a valid routecap wire encoding (the message says what is wrong)."""


def _fail(msg: str) -> CodecError:
    return CodecError(f"routecap wire decode: {msg}")


# ---- encoding -----------------------------------------------------------------------------------
def _fields(rows_NK: np.ndarray, mode: str, E: int, K: int) -> np.ndarray:
    """[N, M] fields of each row for ``mode``."""
    if mode == "ids":
        return rows_NK.astype(np.uint64)
    order = mode == "order"
    ranks, perms = kernels.rank_rows(rows_NK, E, order)
    return np.stack([ranks, perms], axis=1) if order else ranks[:, None]


class _NotCodable(Exception):
    """A block the entropy mode cannot code (a table would not fit 11-bit frequencies)."""


def _block_payload(ids_TLK: np.ndarray, missing_TL: np.ndarray | None, mode: str, layout: str,
                   E: int) -> bytes:
    """One block's routes before zstd (missing cells hold zero rows or fields; the entropy
    mode leaves them out)."""
    T, L, K = ids_TLK.shape
    if mode == "entropy":
        payload = entropy_kernels.encode_block(ids_TLK, missing_TL, E)
        if payload is None:
            raise _NotCodable
        return payload
    if mode == "raw":
        arr = ids_TLK.transpose(1, 0, 2) if layout == "layer" else ids_TLK
        return np.ascontiguousarray(arr).tobytes()
    widths = widths_of(mode, E, K)
    fields = _fields(ids_TLK.reshape(-1, K), mode, E, K)
    if missing_TL is not None:
        fields[missing_TL.ravel()] = 0
    return kernels.pack_rows(fields, widths, T, L)


def _zstd(data: bytes, level: int, *, checksum: bool = True) -> bytes:
    return zstandard.ZstdCompressor(level=level, write_checksum=checksum,
                                    write_content_size=True).compress(data)


def _routes(trace: RoutingTrace, mode: str, layout: str, block: int, level: int,
            force_zstd: bool, checksum: bool = True) -> tuple[dict[str, Any], bytes]:
    """The routes section for one storage choice: (header fields, stored bytes).

    Each block is ``[stored bytes, codec]``, plus the CRC-32 of the stored bytes where zstd's
    own frame checksum is left out (the one-frame raw candidate, byte for byte ``zstd(raw)``)
    or the block is stored uncompressed.
    """
    ids, miss = trace.expert_ids, trace.missing
    blocks, stored, payloads = [], [], []
    for t0 in range(0, trace.num_tokens, block):
        raw = _block_payload(ids[t0:t0 + block], None if miss is None else miss[t0:t0 + block],
                             mode, layout, trace.num_experts)
        payloads.append(len(raw))
        z = _zstd(raw, level, checksum=checksum)
        if force_zstd or len(z) < len(raw):
            blocks.append([len(z), "zstd"] if checksum else
                          [len(z), "zstd", zlib.crc32(z) & 0xFFFFFFFF])
            stored.append(z)
        else:
            blocks.append([len(raw), "none", zlib.crc32(raw) & 0xFFFFFFFF])
            stored.append(raw)
    widths = [] if mode in ("raw", "entropy") else widths_of(mode, trace.num_experts, trace.top_k)
    meta = {"mode": mode, "widths": widths, "layout": layout, "block_tokens": block,
            "blocks": blocks}
    if mode == "entropy":  # the payloads' sizes are not fixed by the shape: the header says them
        meta["payload_bytes"] = payloads
    return meta, b"".join(stored)


def encode(trace: RoutingTrace, *, mode: str = "auto", level: int = 3, fallback: bool = True,
           block_tokens: int = BLOCK_TOKENS) -> bytes:
    """The wire encoding of one trace.

    ``mode``: ``order`` keeps the router's order (lossless for any trace); ``set`` stores each
    row as a set (the trace must be ``topk_order="sorted"``: call ``trace.with_sorted_topk()``
    when the order does not matter, as in replay); ``entropy`` stores sets too, coded with each
    layer's expert frequencies (smaller than ``set`` on skewed routes, slower to encode and
    decode; ``set`` is stored where its tables cannot be built, E - K + 1 > 1024); ``auto``
    picks ``set`` for sorted traces and ``order`` otherwise; ``ids`` and ``raw`` are the
    fallbacks for very large E. With ``fallback`` (the default) the routes are stored as zstd
    over the raw ids whenever that is smaller (layer-major, or token-major in one frame: exactly
    ``zstd(raw ids)``).

    Example:
        >>> import numpy as np
        >>> t = RoutingTrace.from_ids(np.array([[[5, 1]], [[2, 7]]]), num_experts=8,
        ...                           moe_layers=[0], request_id="r", prompt_len=1)
        >>> decode(encode(t)).equals(t)
        True
    """
    if not isinstance(trace, RoutingTrace):
        raise TypeError(f"encode: expected a RoutingTrace, got {type(trace).__name__}")
    if mode not in MODES:
        raise ValueError(f"encode: mode must be one of {MODES}, got {mode!r}")
    if not isinstance(block_tokens, int) or block_tokens < 1:
        raise ValueError(f"encode: block_tokens must be a positive int, got {block_tokens!r}")
    E, K, T = trace.num_experts, trace.top_k, trace.num_tokens
    if mode == "auto":
        mode = "set" if trace.topk_order == "sorted" else "order"
    if mode in ("set", "entropy") and trace.topk_order != "sorted":
        raise ValueError(f"encode: mode={mode!r} drops the order within each row; pass "
                         "trace.with_sorted_topk() to say so, or use mode='order'")
    best = None
    if mode == "entropy":
        if entropy.fits(E, K):
            try:
                best = _routes(trace, mode, "layer", block_tokens, level, force_zstd=False)
            except _NotCodable:
                pass
        mode = "set"  # what is stored when the entropy coder cannot code these routes
    if mode in ("set", "order") and not mode_fits(mode, E, K):
        mode = "ids"
    if best is None:
        best = _routes(trace, mode, "token", block_tokens, level, force_zstd=mode == "raw")
    if fallback and mode != "raw" and T:
        for cand in (("raw", "layer", block_tokens, True), ("raw", "token", T, False)):
            got = _routes(trace, *cand[:3], level, force_zstd=True, checksum=cand[3])
            if len(got[1]) < len(best[1]):
                best = got
    route_meta, route_bytes = best
    sections: list[tuple[dict[str, Any], bytes]] = [(
        {"name": "routes", "bytes": len(route_bytes), "codec": "blocks"}, route_bytes)]
    for name, raw in (("missing", None if trace.missing is None else
                       np.packbits(trace.missing, bitorder="little").tobytes()),
                      ("tokens", None if trace.token_ids is None else
                       trace.token_ids.astype("<i4").tobytes())):
        if raw is None:
            continue
        z = _zstd(raw, level)
        if len(z) < len(raw):
            sections.append(({"name": name, "bytes": len(z), "codec": "zstd",
                              "raw_bytes": len(raw)}, z))
        else:
            sections.append(({"name": name, "bytes": len(raw), "codec": "none",
                              "crc32": zlib.crc32(raw) & 0xFFFFFFFF}, raw))
    header = {
        "format": "routecap.wire", "version": WIRE_VERSION, "trace_format": FORMAT_VERSION,
        "request_id": trace.request_id, "model": trace.model, "num_experts": E, "top_k": K,
        "moe_layers": list(trace.moe_layers), "num_tokens": T, "start": trace.start,
        "prompt_len": trace.prompt_len, "topk_order": trace.topk_order, "extra": trace.extra,
        "routes": route_meta, "sections": [m for m, _ in sections],
    }
    raw_header = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    return b"".join([MAGIC, struct.pack("<BBI", WIRE_VERSION, 0, len(raw_header)), raw_header,
                     *(s for _, s in sections)])


# ---- decoding -----------------------------------------------------------------------------------
def _int(h: dict, key: str, lo: int, hi: int) -> int:
    v = h.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise _fail(f"header field {key!r} should be an int in [{lo}, {hi}], got {str(v)[:40]}")
    return v


def _unzstd(what: str, frame: bytes, size: int) -> bytes:
    """Decompress one zstd frame that must hold exactly ``size`` bytes."""
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError:
        raise _fail(f"corrupt zstd frame in {what}") from None
    if declared != size:
        raise _fail(f"corrupt {what}: its zstd frame holds {declared} bytes, expected {size}")
    try:
        out = zstandard.ZstdDecompressor().decompress(frame, max_output_size=max(size, 1))
    except zstandard.ZstdError as e:
        raise _fail(f"corrupt zstd data in {what} ({e})") from None
    if len(out) != size:
        raise _fail(f"corrupt {what}: {len(out)} bytes after zstd, expected {size}")
    return out


def _parse(data: Any) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The header and the sections' stored bytes, every size and checksum checked."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 10 or data[:4] != MAGIC:
        raise _fail("not a routecap wire encoding (bad magic)" if len(data) >= 4
                    else f"truncated: {len(data)} bytes")
    version, _, H = struct.unpack_from("<BBI", data, 4)
    if version != WIRE_VERSION:
        raise _fail(f"wire version {version} is not the version this routecap reads "
                    f"({WIRE_VERSION})" + ("; upgrade routecap" if version > WIRE_VERSION else ""))
    if H > _MAX_HEADER or 10 + H > len(data):
        raise _fail(f"truncated or corrupt: a header of {H} bytes in {len(data)} bytes")
    try:
        h = json.loads(data[10:10 + H])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _fail(f"corrupt header ({type(e).__name__})") from None
    if not isinstance(h, dict) or h.get("format") != "routecap.wire":
        raise _fail("corrupt header (not a routecap.wire header)")
    secs = h.get("sections")
    if not isinstance(secs, list) or not 1 <= len(secs) <= 3:
        raise _fail("corrupt header: 'sections' should be a list of 1 to 3")
    pos = 10 + H
    out: dict[str, Any] = {}
    meta: dict[str, dict[str, Any]] = {}
    for s in secs:
        if not isinstance(s, dict) or s.get("name") not in ("routes", "missing", "tokens") \
                or s.get("name") in out:
            raise _fail(f"corrupt header: bad section {str(s)[:80]}")
        n = _int(s, "bytes", 0, len(data))
        if pos + n > len(data):
            raise _fail(f"truncated: section {s['name']!r} needs {n} bytes at {pos}, the data "
                        f"has {len(data)}")
        stored = memoryview(data)[pos:pos + n]  # no copy of the (large) routes section
        pos += n
        codec = s.get("codec")
        if s["name"] == "routes":
            if codec != "blocks":
                raise _fail(f"corrupt header: routes codec {codec!r}")
        elif codec == "none":
            if zlib.crc32(stored) & 0xFFFFFFFF != s.get("crc32"):
                raise _fail(f"corrupt data: checksum mismatch in section {s['name']!r}")
        elif codec == "zstd":
            # decompressed later, by decode(), to the size the trace's shape dictates
            _int(s, "raw_bytes", 0, 4 * _MAX_IDS)
            meta[s["name"]] = s
        else:
            raise _fail(f"corrupt header: section codec {codec!r}")
        out[s["name"]] = stored
    if pos != len(data):
        raise _fail(f"{len(data) - pos} unexpected bytes after the last section")
    if "routes" not in out:
        raise _fail("no 'routes' section")
    h["_zstd_sections"] = meta
    return h, out


def _section(h: dict[str, Any], secs: dict[str, Any], name: str, size: int) -> bytes | None:
    """A small section's bytes, which must be exactly ``size`` long (zstd: declared so first)."""
    if name not in secs:
        return None
    z = h["_zstd_sections"].get(name)
    if z is not None:
        if z["raw_bytes"] != size:
            raise _fail(f"corrupt section {name!r}: it declares {z['raw_bytes']} bytes, the "
                        f"trace's shape needs {size}")
        return _unzstd(f"section {name!r}", secs[name], size)
    if len(secs[name]) != size:
        raise _fail(f"corrupt section {name!r}: {len(secs[name])} bytes, expected {size}")
    return secs[name]


def inspect(data: bytes) -> dict[str, Any]:
    """The header of an encoding (mode, sizes, metadata), after checking its structure."""
    h, _ = _parse(data)
    h.pop("_zstd_sections", None)
    return h


def decode(data: bytes) -> RoutingTrace:
    """The trace an :func:`encode` produced; :class:`CodecError` for anything else."""
    h, secs = _parse(data)
    E = _int(h, "num_experts", 1, 1 << 16)
    K = _int(h, "top_k", 1, E)
    T = _int(h, "num_tokens", 0, _MAX_IDS)
    layers = h.get("moe_layers")
    if not isinstance(layers, list) or not 1 <= len(layers) <= 4096:
        raise _fail(f"header field 'moe_layers' should be a list of 1 to 4096 ints, got "
                    f"{str(layers)[:80]}")
    L = len(layers)
    if T * L * K > _MAX_IDS:
        raise _fail(f"refusing {T} x {L} x {K} ids (more than {_MAX_IDS})")
    missing = None
    raw = _section(h, secs, "missing", (T * L + 7) // 8)
    if raw is not None:
        missing = np.unpackbits(np.frombuffer(raw, np.uint8),
                                bitorder="little")[:T * L].astype(bool).reshape(T, L)
    tokens = None
    raw = _section(h, secs, "tokens", 4 * T)
    if raw is not None:
        tokens = np.frombuffer(raw, "<i4").astype(np.int32)
    order = h.get("topk_order")
    r = h.get("routes")
    if not isinstance(r, dict):
        raise _fail("corrupt header: no 'routes' description")
    extra = h.get("extra")
    if not isinstance(extra, dict):
        raise _fail(f"corrupt header: 'extra' should be a dict, got {str(extra)[:40]}")
    ids = _decode_routes(secs["routes"], r, T, L, E, K, missing, sorted_rows=order == "sorted")
    try:
        # every row was checked while decoding (in range, distinct, sorted where the trace says
        # so, zero where missing): the trusted constructor checks the rest without a rescan
        return RoutingTrace.from_verified(
            expert_ids=ids, missing=missing, token_ids=tokens, num_experts=E, moe_layers=layers,
            request_id=h.get("request_id"), prompt_len=h.get("prompt_len"), start=h.get("start"),
            model=h.get("model"), topk_order=order, extra=extra)
    except TraceValidationError as e:
        raise _fail(f"the decoded trace breaks the contract: {e}") from None


def _decode_routes(buf: bytes, r: dict[str, Any], T: int, L: int, E: int, K: int,
                   missing: np.ndarray | None, *, sorted_rows: bool) -> np.ndarray:
    """``[T, L, K]`` ids from the routes section; blocks decode in parallel, every row checked."""
    mode = r.get("mode")
    layout = r.get("layout")
    layouts = {"order": ("token",), "set": ("token",), "ids": ("token",),
               "raw": ("token", "layer"), "entropy": ("layer",)}
    if not isinstance(mode, str) or mode not in layouts or layout not in layouts[mode]:
        raise _fail(f"corrupt header: routes stored as mode {str(mode)[:40]!r}, layout "
                    f"{str(layout)[:40]!r}")
    if mode in ("set", "entropy") and not sorted_rows:
        raise _fail(f"corrupt header: {mode} mode for a trace whose rows are not sorted")
    widths = r.get("widths")
    if mode in ("raw", "entropy"):
        if widths != []:
            raise _fail(f"corrupt header: {mode} routes have no field widths")
        if mode == "entropy" and not entropy.fits(E, K):
            raise _fail(f"mode 'entropy' cannot encode E={E}, K={K}")
    else:
        if mode != "ids" and not mode_fits(mode, E, K):
            raise _fail(f"mode {mode!r} cannot encode E={E}, K={K}")
        if not (isinstance(widths, list) and all(type(w) is int for w in widths)) or \
                widths != widths_of(mode, E, K):
            raise _fail(f"field widths {str(widths)[:80]} are not those of mode {mode!r} at "
                        f"E={E}, K={K}")
    bt = _int(r, "block_tokens", 1, _MAX_IDS)
    blocks = r.get("blocks")
    n_blocks = -(-T // bt)
    if not isinstance(blocks, list) or len(blocks) != n_blocks:
        raise _fail(f"corrupt header: {T} tokens in blocks of {bt} need {n_blocks} blocks")
    dtype = id_dtype_for(E)
    per_token = L * K * dtype.itemsize if mode == "raw" else \
        0 if mode == "entropy" else token_bytes(L, widths)
    payloads = r.get("payload_bytes") if mode == "entropy" else None
    if mode == "entropy" and not (isinstance(payloads, list) and len(payloads) == n_blocks):
        raise _fail(f"corrupt header: entropy routes need 'payload_bytes' for {n_blocks} blocks, "
                    f"got {str(payloads)[:40]}")
    sizes = []
    for i in range(n_blocks):
        Tb = min(T, (i + 1) * bt) - i * bt
        if payloads is None:
            sizes.append(Tb * per_token)
            continue
        p = payloads[i]
        top = entropy.max_payload(Tb, L, K, E)
        if not isinstance(p, int) or isinstance(p, bool) or not 0 <= p <= top:
            raise _fail(f"corrupt header: entropy payload of block {i} should be an int in "
                        f"[0, {top}], got {str(p)[:40]}")
        sizes.append(p)
    spans = []
    pos = 0
    for i, b in enumerate(blocks):
        if not (isinstance(b, list) and len(b) in (2, 3) and isinstance(b[0], int)
                and not isinstance(b[0], bool) and b[0] >= 0 and b[1] in ("zstd", "none")
                and (len(b) == 3 or b[1] == "zstd")):
            raise _fail(f"corrupt header: block {i} is {str(b)[:40]}")
        if len(b) == 3 and zlib.crc32(buf[pos:pos + b[0]]) & 0xFFFFFFFF != b[2]:
            raise _fail(f"corrupt data: checksum mismatch in routes block {i}")
        t0 = i * bt
        t1 = min(T, t0 + bt)
        size = sizes[i]
        if b[1] == "none" and b[0] != size:
            raise _fail(f"corrupt routes block of tokens [{t0}, {t1}): {b[0]} bytes, expected "
                        f"{size}")
        if b[1] == "zstd":
            try:
                declared = zstandard.frame_content_size(buf[pos:pos + b[0]])
            except zstandard.ZstdError:
                raise _fail(f"corrupt zstd frame in routes block of tokens [{t0}, {t1})") from None
            if declared != size:
                raise _fail(f"corrupt routes block of tokens [{t0}, {t1}): its zstd frame holds "
                            f"{declared} bytes, expected {size}")
        spans.append((t0, t1, pos, b[0], b[1], size))
        pos += b[0]
    if pos != len(buf):
        raise _fail(f"corrupt routes: blocks hold {pos} bytes, the section {len(buf)}")
    # every size is known to agree: only now allocate
    out = np.empty((T * L, K), dtype)
    skip = np.zeros(0, bool) if missing is None else missing.ravel()

    def block(span: tuple[int, int, int, int, str, int]) -> int:
        t0, t1, off, n, codec, size = span
        Tb = t1 - t0
        raw = buf[off:off + n]
        if codec == "zstd":
            raw = _unzstd(f"routes block of tokens [{t0}, {t1})", raw, size)
        elif n != size:
            raise _fail(f"corrupt routes block of tokens [{t0}, {t1}): {n} bytes, expected "
                        f"{size}")
        sk = skip[t0 * L:t1 * L] if skip.shape[0] else skip
        dst = out[t0 * L:t1 * L]
        if mode == "entropy":
            bad = entropy_kernels.decode_block(raw, Tb, L, E, sk, dst)
            if bad == entropy.BAD_TABLES:
                raise _fail(f"corrupt routes block of tokens [{t0}, {t1}): its popularity "
                            "orders or frequency tables are not valid")
            if bad == entropy.BAD_STREAM:
                raise _fail(f"corrupt routes block of tokens [{t0}, {t1}): its rANS stream "
                            "does not decode to exactly its rows")
        elif mode == "raw":
            bad = kernels.decode_raw_block(np.frombuffer(raw, dtype), layout == "layer", Tb, L, E,
                                           sorted_rows, sk, dst)
        else:
            bad = kernels.decode_packed_block(raw, mode, widths, Tb, L, E, sorted_rows, sk, dst)
        return -1 if bad < 0 else t0 * L + int(bad)

    results = _map(block, spans)
    bad = [b for b in results if b >= 0]
    if bad:
        row = min(bad)
        raise _fail(f"corrupt routes: row {row} (token {row // L}, layer {row % L}) is not a "
                    f"valid route (out of range, repeated or unsorted ids)")
    return out.reshape(T, L, K)


def _map(fn: Callable[[Any], int], items: list[Any]) -> list[int]:
    """``fn`` over items, on several threads when there are several (zstd and the numba kernels
    release the GIL, so blocks decode side by side)."""
    workers = min(len(items), os.cpu_count() or 1)
    if workers <= 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))
