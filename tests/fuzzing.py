"""Byte-level mutations shared by the decoders' fuzz tests (seeded, deterministic)."""

from __future__ import annotations

import numpy as np


def mutate(rng: np.random.Generator, data: bytes, rounds: int | None = None) -> bytes:
    """1-3 random edits: overwrite a byte, truncate, or insert random bytes."""
    b = bytearray(data)
    for _ in range(rounds if rounds is not None else int(rng.integers(1, 4))):
        op = rng.integers(3)
        if op == 0 and b:
            b[int(rng.integers(len(b)))] = int(rng.integers(256))
        elif op == 1:
            b = b[:int(rng.integers(len(b) + 1))]
        else:
            i = int(rng.integers(len(b) + 1))
            b = b[:i] + bytes(rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8)) + b[i:]
    return bytes(b)
