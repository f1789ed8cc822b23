"""Session-wide settings of the test suite.

One intra-op thread per test process (and per subprocess it starts, through the environment):
``make test`` runs one pytest worker per core (pytest-xdist), and multi-process tests add ranks
on top; torch's OpenMP pool of one thread per core in each of them oversubscribes the cores, and
its threads then wait on each other for whole scheduler slices (a 64-wide linear layer took 30 ms
instead of microseconds on the 2-core CI machine).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
