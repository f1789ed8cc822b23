"""A compact, lossless, self-describing wire encoding for one routing trace.

Shape legend: T tokens, L MoE layers, K top-k, E experts, N = T * L rows (one row: the K ids one
layer chose for one token).

Each row is a set of K distinct ids out of E. Instead of K bytes it is written as integers:

* ``set`` mode (ids sorted within each row; the decoded trace says ``topk_order="sorted"``):
  the row's rank among the K-subsets of E in the combinatorial number system,
  ``sum_i C(c_i, i)`` over the sorted ids ``c_1 < ... < c_K``: ``ceil(log2 C(E, K))`` bits, within
  one bit of the information bound (0.64x raw uint8 at 128/8, 0.77x at 256/8);
* ``order`` mode (the router's order kept): that rank, then the Lehmer code of the order,
  ``ceil(log2 C(E, K)) + ceil(log2 K!)`` bits, within two bits of ``log2(C(E, K) * K!)``;
* ``ids`` mode (ranks would not fit 57 bits, e.g. E = 65536): each id in ``ceil(log2 E)`` bits;
* ``entropy`` mode (sets, like ``set``; opt-in): per block and layer the experts ranked by how
  often the block routes to them, each row's ascending ranks coded as gaps with one frequency
  table per (layer, position in the row) and rANS (:mod:`~routecap.codec.entropy`). On routes
  with a trained router's skew it is 4.5-17% smaller than ``set``, decodes at 0.4-0.7x its speed
  and encodes at a fifth; ``auto`` does not pick it (docs/trace-format.md gives the figures).

Rows are packed token by token, a token's L rows one after the other, each token starting on a
byte. Tokens go in blocks (16384 by default) that are compressed (zstd) and decoded independently,
in parallel. Consecutive tokens are correlated, a layer's sets repeating across tokens far more
than a token's sets repeat across layers: zstd over the raw ids in layer-major order within a
block often beats the packed rows, and the encoder then stores that instead. It keeps the
smallest of: packed rows, raw ids layer-major, and raw ids token-major in one zstd frame (exactly
what ``zstd(raw ids)`` would be), so an encoding is never larger than raw ids + zstd, plus its
header. Missing cells are a bit mask (their rows hold zeros). Token ids, if any, travel too.

Layout (little-endian)::

    b"RCAP" | u8 version (1) | u8 0 | u32 header length H | H bytes of JSON header | sections

The JSON header carries the trace's metadata, how the routes are stored (mode, field widths,
layout, tokens per block, each block's stored size and codec) and the sections (name, byte
length, codec, CRC-32 of uncompressed sections; zstd frames carry their own checksum) that follow
it, in order. Decoding checks every length, checksum and field before it allocates or reads, lets
zstd write only the size the header promised, and checks every row (ranks in range; raw ids in
``[0, E)``, distinct, sorted where the trace says so), so hostile input gets a
:class:`CodecError`, never an out-of-bounds read, a crash or a hang.

The package: :mod:`~routecap.codec.ranking` (the ranking maths and its numpy reference),
:mod:`~routecap.codec.kernels` (the compiled kernels behind checked entry points),
:mod:`~routecap.codec.entropy` and :mod:`~routecap.codec.entropy_kernels` (the entropy mode's
model and reference coder, and its compiled kernels) and :mod:`~routecap.codec.wire` (the
container: header, sections, blocks; ``encode``/``decode``).
"""

from .kernels import HAVE_NUMBA as _HAVE_NUMBA  # noqa: F401 - `routecap doctor` reports it
from .wire import BLOCK_TOKENS, MODES, SET_MODES, WIRE_VERSION, CodecError, decode, encode, inspect

__all__ = ["BLOCK_TOKENS", "CodecError", "MODES", "SET_MODES", "WIRE_VERSION", "decode", "encode",
           "inspect"]
