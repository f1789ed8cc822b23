"""Writes the golden files of tests/test_golden.py (run from the repository root).

Run it only for a deliberate format change, together with a new format or wire version and a
reader that still reads the files written before (commit the old files beside the new ones):
    PYTHONPATH=src python tests/golden/make_golden.py
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from test_golden import RECORDS, TRACE_FILE, golden_trace, record_args  # noqa: E402

from routecap import codec  # noqa: E402
from routecap.files import save_file  # noqa: E402


def main() -> None:
    save_file([golden_trace(128, 8, seed=0), golden_trace(128, 8, seed=1, tokens=False)],
              HERE / TRACE_FILE)
    for name in RECORDS:
        trace, kwargs = record_args(name)
        (HERE / name).write_bytes(codec.encode(trace, **kwargs))
        print(name, codec.inspect((HERE / name).read_bytes())["routes"]["mode"])


if __name__ == "__main__":
    main()
