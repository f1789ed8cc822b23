"""Session-wide settings of the test suite.

One intra-op thread per test process (and per subprocess it starts, through the environment):
``make test`` runs one pytest worker per core (pytest-xdist), and multi-process tests add ranks
on top; torch's OpenMP pool of one thread per core in each of them oversubscribes the cores, and
its threads then wait on each other for whole scheduler slices (a 64-wide linear layer took 30 ms
instead of microseconds on the 2-core CI machine).
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.fixture(params=[True, False], ids=["numba", "numpy"])
def kernels(request, monkeypatch):
    """The codec's compiled kernels, then its numpy reference."""
    from routecap.codec import kernels as codec_kernels

    if request.param and not codec_kernels.HAVE_NUMBA:
        pytest.skip("numba is not installed")
    monkeypatch.setattr(codec_kernels, "USE_NUMBA", request.param)
    return request.param
