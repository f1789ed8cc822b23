"""The replay benchmarks run (tiny shapes on CPU), so that they cannot rot between GPU runs."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import replay_step  # noqa: E402
import train_inference_gap  # noqa: E402


def test_replay_step_runs_tiny(capsys):
    res = replay_step.main(["--tiny", "--repeats", "2", "--warmup", "1", "--chunk", "2",
                            "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.count("replay / plain (medians)") == 2  # synced and pipelined
    assert set(res["median_s"]) == {"synced/plain", "synced/replay", "pipelined/plain",
                                    "pipelined/replay"}
    assert all(t > 0 for t in res["median_s"].values()) and res["setup_s"] > 0


def test_train_inference_gap_runs_builtin(capsys):
    res = train_inference_gap.main(["--batch", "3", "--prompt", "6", "--new", "5"])
    out = capsys.readouterr().out
    assert "routes differ" in out
    assert res["replay"]["route_diff"] == 0.0  # the script asserts it too
    for r in res.values():
        assert r["k3"] >= 0 and 0 <= r["route_diff"] <= 1
