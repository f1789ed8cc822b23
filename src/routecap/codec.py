"""A compact, lossless, self-describing wire encoding for one routing trace.

Shape legend: T tokens, L MoE layers, K top-k, E experts, N = T * L rows (one row: the K ids one
layer chose for one token).

Each row is a set of K distinct ids out of E. Instead of K bytes it is written as one integer:

* ``set`` mode (the trace's ids sorted within each row; the decoded trace says
  ``topk_order="sorted"``): the row's rank among all K-subsets of E in the combinatorial number
  system, ``sum_i C(c_i, i)`` over the sorted ids ``c_1 < ... < c_K``; a row costs
  ``ceil(log2 C(E, K))`` bits, within one bit of the information bound (0.63x raw uint8 at
  128/8, 0.77x at 256/8);
* ``order`` mode (the router's order kept): the subset rank times K! plus the Lehmer code of
  the order, ``ceil(log2(C(E, K) * K!))`` bits (two fields when that exceeds 57 bits);
* ``ids`` mode (when ranks do not fit 64-bit integers, E very large): each id in
  ``ceil(log2 E)`` bits.

The packed rows then go through zstd when that makes them smaller, and the encoder keeps the
smallest of that and zstd over raw ids, so an encoding is never larger than raw ids + zstd (plus a
small header). Missing cells are a bit mask and are not encoded as rows. Token ids, if the trace
has them, travel zstd-compressed.

Layout (little-endian)::

    b"RCAP" | u8 version (1) | u8 0 | u32 header length H | H bytes of JSON header | sections

The JSON header carries the trace's metadata, the mode and field widths, the row count, and the
sections (name, byte length, ``zstd`` or ``none``, CRC-32 of the stored bytes) that follow it, in
order. Decoding checks every length, CRC and field before it allocates or reads anything, decodes
zstd only to the size the header promised, and checks every rank against its range, so hostile
input gets a :class:`CodecError`, never an out-of-bounds read, a crash or a hang.
"""

from __future__ import annotations

import functools
import json
import math
import struct
import zlib
from dataclasses import replace
from typing import Any

import numpy as np
import zstandard

from .trace import FORMAT_VERSION, RoutingTrace, TraceValidationError, id_dtype_for, validate_trace

__all__ = ["CodecError", "MODES", "decode", "encode", "inspect"]

MAGIC = b"RCAP"
WIRE_VERSION = 1
MODES = ("auto", "order", "set", "ids", "raw")
_MAX_HEADER = 1 << 20
_MAX_IDS = 1 << 31  # refuse to allocate more ids than this from a header
_FIELD_BITS = 57  # a field is read with one unaligned 8-byte load: bit offset (<= 7) + width <= 64
_LUT_BITS = 16

try:  # numba makes ranking and unranking ~20x faster; without it numpy does the same work
    import numba as _nb

    _HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised when numba is absent
    _HAVE_NUMBA = False


class CodecError(ValueError):
    """Data that is not a valid routecap wire encoding (the message says what is wrong)."""


# ---- combinatorics ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def _tables(E: int, K: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``comb[i, c] = C(c, i)`` (with a sentinel past E), unranking LUTs and their shifts."""
    comb = np.zeros((K + 1, E + 2), np.uint64)
    for i in range(K + 1):
        for c in range(E + 1):
            comb[i, c] = math.comb(c, i)
        comb[i, E + 1] = np.uint64((1 << 64) - 1)  # larger than any rank: stops the fix-up loop
    lut = np.zeros((K + 1, 1 << _LUT_BITS), np.int32)
    shifts = np.zeros(K + 1, np.int64)
    for i in range(1, K + 1):
        s = max(0, math.comb(E, i).bit_length() - _LUT_BITS)
        shifts[i] = s
        starts = (np.arange(1 << _LUT_BITS, dtype=np.uint64) << np.uint64(s))
        # the largest c with C(c, i) <= the bucket's first value
        lut[i] = np.searchsorted(comb[i, :E + 1], starts, side="right").astype(np.int32) - 1
    return comb, lut, shifts


def _widths(mode: str, E: int, K: int) -> list[int]:
    if mode == "ids":
        return [max(1, (E - 1).bit_length())] * K
    subsets = math.comb(E, K)
    w_set = max(1, (subsets - 1).bit_length())
    if mode == "set":
        return [w_set]
    w_both = max(1, (subsets * math.factorial(K) - 1).bit_length())
    if w_both <= _FIELD_BITS:
        return [w_both]
    return [w_set, max(1, (math.factorial(K) - 1).bit_length())]


def _mode_fits(mode: str, E: int, K: int) -> bool:
    if mode == "ids":
        return True
    if math.comb(E, K).bit_length() > _FIELD_BITS or math.factorial(K).bit_length() > _FIELD_BITS:
        return False
    return all(w <= _FIELD_BITS for w in _widths(mode, E, K))


# ---- kernels (numba when available; the numpy versions are the reference) ---------------------
def _rank_np(ids_NK: np.ndarray, comb: np.ndarray, order: bool) -> tuple[np.ndarray, np.ndarray]:
    """Subset ranks and Lehmer codes of the rows (numpy reference)."""
    N, K = ids_NK.shape
    srt = np.sort(ids_NK.astype(np.int64), axis=1)
    ranks = np.zeros(N, np.uint64)
    for i in range(K):
        ranks += comb[i + 1, srt[:, i]]
    perms = np.zeros(N, np.uint64)
    if order:
        pos = np.argsort(np.argsort(ids_NK, axis=1, kind="stable"), axis=1)  # slot -> sorted index
        # Lehmer code of the sequence of sorted indices in slot order
        seq = np.argsort(pos, axis=1)  # not needed: compute directly below
        del seq
        rank_in_sorted = np.argsort(np.argsort(ids_NK, axis=1, kind="stable"), axis=1)
        for j in range(K):
            smaller = (rank_in_sorted[:, j + 1:] < rank_in_sorted[:, j:j + 1]).sum(axis=1)
            perms += smaller.astype(np.uint64) * np.uint64(math.factorial(K - 1 - j))
        del pos
    return ranks, perms


def _unrank_np(ranks: np.ndarray, perms: np.ndarray | None, comb: np.ndarray, K: int,
               E: int) -> np.ndarray:
    N = ranks.shape[0]
    out = np.zeros((N, K), np.int64)
    x = ranks.copy()
    for i in range(K, 0, -1):
        c = np.searchsorted(comb[i, :E + 1], x, side="right").astype(np.int64) - 1
        out[:, i - 1] = c
        x -= comb[i, c]
    if perms is not None:
        p = perms.astype(np.int64)
        avail = np.tile(np.arange(K), (N, 1))
        res = np.zeros((N, K), np.int64)
        rows = np.arange(N)
        for j in range(K):
            f = math.factorial(K - 1 - j)
            d = p // f
            p = p % f
            # the d-th smallest still-available sorted index
            order_avail = np.sort(avail, axis=1)
            pick = order_avail[rows, d]
            res[:, j] = pick
            avail[rows, np.argmax(avail == pick[:, None], axis=1)] = K + 1
        out = np.take_along_axis(out, res, axis=1)
    return out


if _HAVE_NUMBA:

    @_nb.njit(cache=True, nogil=True)
    def _rank_nb(ids_NK, comb, order, fact, ranks, perms):  # pragma: no cover - compiled
        N, K = ids_NK.shape
        buf = np.empty(K, np.int64)
        for r in range(N):
            for j in range(K):
                buf[j] = ids_NK[r, j]
            # insertion sort of K small ints
            for a in range(1, K):
                v = buf[a]
                b = a - 1
                while b >= 0 and buf[b] > v:
                    buf[b + 1] = buf[b]
                    b -= 1
                buf[b + 1] = v
            s = np.uint64(0)
            for i in range(K):
                s += comb[i + 1, buf[i]]
            ranks[r] = s
            if order:
                code = np.uint64(0)
                for j in range(K):
                    smaller = 0
                    for m in range(j + 1, K):
                        if ids_NK[r, m] < ids_NK[r, j]:
                            smaller += 1
                    code += np.uint64(smaller) * fact[K - 1 - j]
                perms[r] = code

    @_nb.njit(cache=True, nogil=True)
    def _pack_nb(fields, width, out, bit0):  # pragma: no cover - compiled
        # LSB-first: field r occupies bits [bit0 + r * width, ...) of out; out is zeroed
        mask = (np.uint64(1) << np.uint64(width)) - np.uint64(1)
        for r in range(fields.shape[0]):
            v = fields[r] & mask
            bit = bit0 + r * width
            p = bit >> 3
            sh = bit & 7
            v = v << np.uint64(sh)
            k = 0
            while v != 0:
                out[p + k] |= np.uint8(v & np.uint64(255))
                v = v >> np.uint64(8)
                k += 1

    @_nb.njit(cache=True, nogil=True, parallel=True)
    def _decode_nb(buf, widths, N, K, E, order, comb, lut, shifts, fact,
                   out):  # pragma: no cover - compiled
        # buf: the packed rows plus 8 zero bytes; returns -1, or a bad row (rank out of range)
        stride = 0
        for w in widths:
            stride += w
        bad = np.full(N, -1, np.int64)
        two = widths.shape[0] == 2
        full = comb[K, E]  # number of K-subsets: ranks must be below
        kfact = fact[K]
        w0 = widths[0]
        m0 = (np.uint64(1) << np.uint64(w0)) - np.uint64(1)
        w1 = widths[1] if two else 0
        m1 = (np.uint64(1) << np.uint64(w1)) - np.uint64(1)
        for r in _nb.prange(N):
            bit = r * stride
            p = bit >> 3
            x = np.uint64(0)
            for b in range(8):
                x |= np.uint64(buf[p + b]) << np.uint64(8 * b)
            x = (x >> np.uint64(bit & 7)) & m0
            perm = np.uint64(0)
            if two:
                bit2 = bit + w0
                p2 = bit2 >> 3
                y = np.uint64(0)
                for b in range(8):
                    y |= np.uint64(buf[p2 + b]) << np.uint64(8 * b)
                perm = (y >> np.uint64(bit2 & 7)) & m1
                if perm >= kfact:
                    bad[r] = r
                    continue
            elif order:
                perm = x % kfact
                x = x // kfact
            if x >= full:
                bad[r] = r
                continue
            for i in range(K, 0, -1):
                c = np.int64(lut[i, x >> np.uint64(shifts[i])])
                while comb[i, c + 1] <= x:
                    c += 1
                out[r, i - 1] = c
                x -= comb[i, c]
            if order:
                # factorial number system -> which sorted id sits in each slot
                used = 0
                srt = out[r].copy()
                for j in range(K):
                    f = fact[K - 1 - j]
                    d = np.int64(perm // f)
                    perm = perm % f
                    k = -1
                    for m in range(K):
                        if not (used >> m) & 1:
                            k += 1
                            if k == d:
                                out[r, j] = srt[m]
                                used |= 1 << m
                                break
        return bad.max()


def _pack(fields: list[np.ndarray], widths: list[int]) -> bytes:
    N = fields[0].shape[0]
    stride = sum(widths)
    nbytes = (N * stride + 7) // 8
    out = np.zeros(nbytes + 8, np.uint8)
    if _HAVE_NUMBA and N:
        # interleave fields row by row: row r's fields at r * stride, r * stride + w0, ...
        if len(fields) == 1:
            _pack_nb(fields[0], widths[0], out, 0)
        else:
            _pack_rows_nb(fields, widths, out, stride)
    elif N:
        bits = np.zeros(N * stride, np.uint8)
        off = 0
        for f, w in zip(fields, widths):
            shifts = np.arange(w, dtype=np.uint64)
            b = ((f[:, None] >> shifts[None, :]) & np.uint64(1)).astype(np.uint8)
            idx = (np.arange(N)[:, None] * stride + off + np.arange(w)[None, :])
            bits[idx.ravel()] = b.ravel()
            off += w
        packed = np.packbits(bits, bitorder="little")
        out[:packed.shape[0]] = packed
    return out[:nbytes].tobytes()


def _pack_rows_nb(fields: list[np.ndarray], widths: list[int], out: np.ndarray,
                  stride: int) -> None:
    # two fields per row: pack each at its bit offset, stride apart
    for k, (f, w) in enumerate(zip(fields, widths)):
        off = sum(widths[:k])
        _pack_strided(f, w, out, off, stride)


def _pack_strided(f: np.ndarray, w: int, out: np.ndarray, off: int, stride: int) -> None:
    if _HAVE_NUMBA:
        _pack_strided_nb(f, w, out, off, stride)


if _HAVE_NUMBA:

    @_nb.njit(cache=True, nogil=True)
    def _pack_strided_nb(fields, width, out, off, stride):  # pragma: no cover - compiled
        mask = (np.uint64(1) << np.uint64(width)) - np.uint64(1)
        for r in range(fields.shape[0]):
            v = fields[r] & mask
            bit = off + r * stride
            p = bit >> 3
            v = v << np.uint64(bit & 7)
            k = 0
            while v != 0:
                out[p + k] |= np.uint8(v & np.uint64(255))
                v = v >> np.uint64(8)
                k += 1


def _unpack_np(buf: np.ndarray, N: int, widths: list[int]) -> list[np.ndarray]:
    stride = sum(widths)
    bits = np.unpackbits(buf, bitorder="little")[:N * stride].reshape(N, stride)
    out, off = [], 0
    for w in widths:
        weights = (np.uint64(1) << np.arange(w, dtype=np.uint64))
        out.append((bits[:, off:off + w].astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64))
        off += w
    return out


# ---- sections ---------------------------------------------------------------------------------
def _zstd(data: bytes, level: int) -> bytes:
    return zstandard.ZstdCompressor(level=level, write_checksum=True,
                                    write_content_size=True).compress(data)


def _section(name: str, data: bytes, level: int, *, force: str | None = None
             ) -> tuple[dict[str, Any], bytes]:
    z = _zstd(data, level) if force != "none" else None
    if force == "zstd" or (z is not None and len(z) < len(data)):
        stored, codec = z, "zstd"
    else:
        stored, codec = data, "none"
    return ({"name": name, "bytes": len(stored), "raw_bytes": len(data), "codec": codec,
             "crc32": zlib.crc32(stored) & 0xFFFFFFFF}, stored)


def _rows_of(trace: RoutingTrace) -> np.ndarray:
    ids = trace.expert_ids
    if trace.missing is not None:
        return ids[~trace.missing]  # [rows, K], token-major
    return ids.reshape(-1, ids.shape[-1])


def _route_payload(rows_NK: np.ndarray, mode: str, E: int, K: int) -> tuple[bytes, list[int]]:
    if mode == "raw":
        return np.ascontiguousarray(rows_NK).tobytes(), []
    widths = _widths(mode, E, K)
    N = rows_NK.shape[0]
    if mode == "ids":
        fields = [np.ascontiguousarray(rows_NK[:, k]).astype(np.uint64) for k in range(K)]
        return _pack(fields, widths), widths
    comb, _, _ = _tables(E, K)
    order = mode == "order"
    if _HAVE_NUMBA:
        ranks = np.empty(N, np.uint64)
        perms = np.zeros(N, np.uint64)
        fact = np.array([math.factorial(i) for i in range(K + 1)], np.uint64)
        _rank_nb(np.ascontiguousarray(rows_NK), comb, order, fact, ranks, perms)
    else:
        ranks, perms = _rank_np(rows_NK, comb, order)
    if not order:
        return _pack([ranks], widths), widths
    if len(widths) == 1:
        return _pack([ranks * np.uint64(math.factorial(K)) + perms], widths), widths
    return _pack([ranks, perms], widths), widths


def encode(trace: RoutingTrace, *, mode: str = "auto", level: int = 3) -> bytes:
    """The wire encoding of one trace.

    ``mode``: ``order`` keeps the router's order (lossless for any trace); ``set`` stores each
    row as a set (the trace must be ``topk_order="sorted"``: call ``trace.with_sorted_topk()``
    when the order does not matter, as in replay); ``auto`` picks ``set`` for sorted traces and
    ``order`` otherwise; ``ids`` and ``raw`` are the fallbacks for very large E.

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
    E, K = trace.num_experts, trace.top_k
    if mode == "auto":
        mode = "set" if trace.topk_order == "sorted" else "order"
    if mode == "set" and trace.topk_order != "sorted":
        raise ValueError("encode: mode='set' drops the order within each row; pass "
                         "trace.with_sorted_topk() to say so, or use mode='order'")
    if mode in ("set", "order") and not _mode_fits(mode, E, K):
        mode = "ids"
    rows = _rows_of(trace)
    payload, widths = _route_payload(rows, mode, E, K)
    sections = []
    meta, stored = _section("routes", payload, level)
    # never larger than zstd over the raw ids: fall back to that when it is smaller
    raw_meta, raw_stored = _section("routes", np.ascontiguousarray(rows).tobytes(), level,
                                    force="zstd")
    if len(raw_stored) < len(stored) and mode != "raw":
        mode, widths, meta, stored = "raw", [], raw_meta, raw_stored
    sections.append((meta, stored))
    if trace.missing is not None:
        sections.append(_section("missing", np.packbits(trace.missing, bitorder="little")
                                 .tobytes(), level))
    if trace.token_ids is not None:
        sections.append(_section("tokens", trace.token_ids.astype("<i4").tobytes(), level))
    header = {
        "format": "routecap.wire", "version": WIRE_VERSION, "trace_format": FORMAT_VERSION,
        "request_id": trace.request_id, "model": trace.model, "num_experts": E, "top_k": K,
        "moe_layers": list(trace.moe_layers), "num_tokens": trace.num_tokens,
        "start": trace.start, "prompt_len": trace.prompt_len, "topk_order": trace.topk_order,
        "extra": trace.extra, "mode": mode, "widths": widths, "rows": int(rows.shape[0]),
        "sections": [m for m, _ in sections],
    }
    raw = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    return b"".join([MAGIC, struct.pack("<BBI", WIRE_VERSION, 0, len(raw)), raw,
                     *(s for _, s in sections)])


# ---- decoding ---------------------------------------------------------------------------------
def _fail(msg: str) -> CodecError:
    return CodecError(f"routecap wire decode: {msg}")


def _int(h: dict, key: str, lo: int, hi: int) -> int:
    v = h.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise _fail(f"header field {key!r} should be an int in [{lo}, {hi}], got {v!r}")
    return v


def _parse(data: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
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
        raise _fail(f"truncated or corrupt: header of {H} bytes in {len(data)} bytes")
    try:
        h = json.loads(data[10:10 + H])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _fail(f"corrupt header ({type(e).__name__})") from None
    if not isinstance(h, dict) or h.get("format") != "routecap.wire":
        raise _fail("corrupt header (not a routecap.wire header)")
    secs = h.get("sections")
    if not isinstance(secs, list) or len(secs) > 3:
        raise _fail("corrupt header: 'sections' should be a list of at most 3")
    pos = 10 + H
    out: dict[str, bytes] = {}
    for s in secs:
        if not isinstance(s, dict) or s.get("name") not in ("routes", "missing", "tokens") \
                or s.get("name") in out or s.get("codec") not in ("zstd", "none"):
            raise _fail(f"corrupt header: bad section {s!r}"[:200])
        n = _int(s, "bytes", 0, len(data))
        raw_n = _int(s, "raw_bytes", 0, _MAX_IDS * 8)
        if pos + n > len(data):
            raise _fail(f"truncated: section {s['name']!r} needs {n} bytes at {pos}, the data "
                        f"has {len(data)}")
        stored = data[pos:pos + n]
        pos += n
        if zlib.crc32(stored) & 0xFFFFFFFF != s.get("crc32"):
            raise _fail(f"corrupt data: checksum mismatch in section {s['name']!r}")
        if s["codec"] == "zstd":
            try:
                size = zstandard.frame_content_size(stored)
            except zstandard.ZstdError:
                raise _fail(f"corrupt zstd frame in section {s['name']!r}") from None
            if size != raw_n:
                raise _fail(f"corrupt section {s['name']!r}: zstd frame holds {size} bytes, "
                            f"the header says {raw_n}")
            try:
                stored = zstandard.ZstdDecompressor().decompress(stored, max_output_size=raw_n)
            except zstandard.ZstdError as e:
                raise _fail(f"corrupt zstd data in section {s['name']!r} ({e})") from None
        if len(stored) != raw_n:
            raise _fail(f"corrupt section {s['name']!r}: {len(stored)} bytes, expected {raw_n}")
        out[s["name"]] = stored
    if pos != len(data):
        raise _fail(f"{len(data) - pos} unexpected bytes after the last section")
    if "routes" not in out:
        raise _fail("no 'routes' section")
    return h, out


def inspect(data: bytes) -> dict[str, Any]:
    """The header of an encoding (mode, sizes, metadata), after checking the whole encoding."""
    h, _ = _parse(data)
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
    mode = h.get("mode")
    if mode not in ("order", "set", "ids", "raw"):
        raise _fail(f"unknown mode {mode!r}")
    n_rows = _int(h, "rows", 0, T * L)
    dtype = id_dtype_for(E)
    missing = None
    if "missing" in secs:
        need = (T * L + 7) // 8
        if len(secs["missing"]) != need:
            raise _fail(f"corrupt missing mask: {len(secs['missing'])} bytes, expected {need}")
        missing = np.unpackbits(np.frombuffer(secs["missing"], np.uint8),
                                bitorder="little")[:T * L].astype(bool).reshape(T, L)
        if int(missing.sum()) != T * L - n_rows:
            raise _fail(f"corrupt: the missing mask leaves {T * L - int(missing.sum())} rows, "
                        f"the header says {n_rows}")
    elif n_rows != T * L:
        raise _fail(f"corrupt: {n_rows} rows encoded for {T * L} cells and no missing mask")
    rows = _decode_rows(secs["routes"], mode, h.get("widths"), n_rows, E, K)
    tokens = None
    if "tokens" in secs:
        if len(secs["tokens"]) != 4 * T:
            raise _fail(f"corrupt token ids: {len(secs['tokens'])} bytes for {T} tokens")
        tokens = np.frombuffer(secs["tokens"], "<i4").astype(np.int32)
    ids = np.zeros((T, L, K), dtype)
    if missing is None:
        ids.reshape(-1, K)[:] = rows
    else:
        ids[~missing] = rows
    order = h.get("topk_order")
    if mode == "set" and order != "sorted":
        raise _fail(f"set mode with topk_order {order!r}")
    fields = dict(expert_ids=ids, missing=missing, token_ids=tokens, num_experts=E,
                  moe_layers=tuple(layers), request_id=h.get("request_id"),
                  prompt_len=h.get("prompt_len"), start=h.get("start"), model=h.get("model"),
                  topk_order=order, extra=h.get("extra"))
    try:
        if mode in ("order", "set"):
            # every id came out of an in-range rank: distinct, in [0, E), sorted in set mode;
            # the rest of the contract is checked without rescanning the ids
            return _checked_metadata(fields)
        return RoutingTrace(**fields)
    except TraceValidationError as e:
        raise _fail(f"the decoded trace breaks the contract: {e}") from None


def _checked_metadata(fields: dict[str, Any]) -> RoutingTrace:
    probe = dict(fields)
    probe["expert_ids"] = fields["expert_ids"][:0]
    probe["missing"] = None
    probe["token_ids"] = None if fields["token_ids"] is None else fields["token_ids"][:0]
    validate_trace(_unvalidated(probe))  # metadata only (T = 0 for the arrays)
    t = fields["token_ids"]
    if t is not None and t.shape != (fields["expert_ids"].shape[0],):
        raise _fail("corrupt token ids")
    return _unvalidated(fields)


def _unvalidated(fields: dict[str, Any]) -> RoutingTrace:
    t = object.__new__(RoutingTrace)
    for k, v in fields.items():
        object.__setattr__(t, k, v)
    object.__setattr__(t, "format_version", FORMAT_VERSION)
    if t.missing is not None and not t.missing.any():
        object.__setattr__(t, "missing", None)
    return t


def _decode_rows(buf: bytes, mode: str, widths: Any, N: int, E: int, K: int) -> np.ndarray:
    dtype = id_dtype_for(E)
    if mode == "raw":
        if len(buf) != N * K * dtype.itemsize:
            raise _fail(f"corrupt raw routes: {len(buf)} bytes for {N} rows")
        return np.frombuffer(buf, dtype).reshape(N, K)
    if not _mode_fits(mode, E, K) and mode != "ids":
        raise _fail(f"mode {mode!r} cannot encode E={E}, K={K}")
    expect = _widths(mode, E, K)
    if widths != expect:
        raise _fail(f"field widths {widths!r} are not those of mode {mode!r} at E={E}, K={K} "
                    f"({expect})")
    stride = sum(expect)
    need = (N * stride + 7) // 8
    if len(buf) != need:
        raise _fail(f"corrupt routes: {len(buf)} bytes for {N} rows of {stride} bits "
                    f"(expected {need})")
    padded = np.zeros(need + 8, np.uint8)
    padded[:need] = np.frombuffer(buf, np.uint8)
    if mode == "ids":
        fields = _unpack_np(padded[:need], N, expect)
        out = np.stack(fields, axis=1) if fields else np.zeros((N, K), np.uint64)
        if N and int(out.max()) >= E:
            raise _fail(f"corrupt routes: an id is >= num_experts={E}")
        return out.astype(dtype)
    comb, lut, shifts = _tables(E, K)
    order = mode == "order"
    if _HAVE_NUMBA and N:
        out = np.empty((N, K), np.int64)
        fact = np.array([math.factorial(i) for i in range(K + 1)], np.uint64)
        bad = _decode_nb(padded, np.asarray(expect, np.int64), N, K, E, order, comb, lut,
                         shifts, fact, out)
        if bad >= 0:
            raise _fail(f"corrupt routes: row {bad} holds a rank outside its range")
        return out.astype(dtype)
    fields = _unpack_np(padded[:need], N, expect)
    full = np.uint64(math.comb(E, K))
    if order and len(expect) == 1:
        kf = np.uint64(math.factorial(K))
        perms, ranks = fields[0] % kf, fields[0] // kf
    elif order:
        ranks, perms = fields
        if N and int(perms.max()) >= math.factorial(K):
            raise _fail("corrupt routes: a row holds an order code outside its range")
    else:
        ranks, perms = fields[0], None
    if N and int(ranks.max()) >= int(full):
        raise _fail("corrupt routes: a row holds a rank outside its range")
    return _unrank_np(ranks, perms, comb, K, E).astype(dtype)


def _with(trace: RoutingTrace, **kw: Any) -> RoutingTrace:
    return replace(trace, **kw)
