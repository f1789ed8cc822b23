"""Shared by the decoders' fuzz tests: byte-level mutations, replayable seeds, failing inputs.

Every fuzz draws from ``fuzz_rng(default)``: the seed is ``ROUTECAP_FUZZ_SEED`` when set (to replay
a failure, or to explore: ``ROUTECAP_FUZZ_SEED=$RANDOM make test``), else the test's fixed default,
and it is printed (pytest shows it with a failing test's output). ``report_failure`` prints the
input that broke a check, with the seed and the input's index, so the failure can be replayed.
"""

from __future__ import annotations

import base64
import contextlib
import os
from collections.abc import Iterator

import numpy as np

SEED_ENV = "ROUTECAP_FUZZ_SEED"


def fuzz_seed(default: int) -> int:
    """``ROUTECAP_FUZZ_SEED`` if set, else ``default``; printed either way."""
    raw = os.environ.get(SEED_ENV, "").strip()
    try:
        seed = int(raw) if raw else default
    except ValueError:
        raise ValueError(f"{SEED_ENV} should be an int, got {raw!r}") from None
    print(f"fuzz seed {seed} (replay: {SEED_ENV}={seed})")
    return seed


def fuzz_rng(default: int) -> tuple[int, np.random.Generator]:
    """The seed (see :func:`fuzz_seed`) and a generator seeded from it."""
    seed = fuzz_seed(default)
    return seed, np.random.default_rng(seed)


@contextlib.contextmanager
def report_failure(seed: int, index: int, data: bytes | str) -> Iterator[None]:
    """Print the input (base64 for bytes) when the body raises, then re-raise."""
    try:
        yield
    except BaseException:
        shown = base64.b64encode(data).decode() if isinstance(data, (bytes, bytearray)) else repr(data)
        print(f"fuzz input {index} of seed {seed} failed ({SEED_ENV}={seed} replays it); "
              f"{len(data)} {'bytes, base64' if isinstance(data, (bytes, bytearray)) else 'chars'}:"
              f"\n{shown}")
        raise


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
