"""`routecap capture --nproc N` through torch's launcher: every run exits 0 and reads back equal
to one process (the teardown race that once ended a run with `terminate called without an active
exception`, ranks exited with codes [-15, -6], must not come back)."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from routecap.files import open_traces

ROOT = Path(__file__).resolve().parents[2]
# launches per --nproc in the slow part. Two of them start `routecap` as a user does (a fresh
# interpreter that starts torch's launcher, whose fork server imports torch and transformers once
# for all ranks); the others call the same CLI from this process, whose fork server then serves
# every launch (each rank is still a fresh process, forked from it): a launch then costs what its
# ranks do, not their imports, and 20 of each fit the suite's budget.
RUNS = int(os.environ.get("ROUTECAP_NPROC_RUNS", "20"))
FRESH = 2
# as cheap as a real run gets: the tiny model, one short prompt per rank, one new token
ARGS = ["capture", "--model", "builtin:tiny-qwen3-moe", "--max-new-tokens", "1",
        "--batch-size", "1"]


def _capture(*args):
    return subprocess.run([sys.executable, "-m", "routecap", *ARGS, *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


def _capture_here(*args):
    from typer.testing import CliRunner

    from routecap.cli import app

    return CliRunner().invoke(app, [*ARGS, *map(str, args)])


def _one_process(tmp_path, prompts):
    r = _capture_here("--prompts", prompts, "--out", tmp_path / "one")
    assert r.exit_code == 0, r.stderr
    return {t.request_id: t for t in open_traces(tmp_path / "one")}


def _equal_to_one(out, one, nproc):
    dp = open_traces(out)
    assert dp.complete and sorted(dp.request_ids()) == sorted(one)
    assert sorted(p.name for p in dp.shards) == [
        f"rank{r:05d}-{dp.run_id}-00000.safetensors" for r in range(nproc)]
    for t in dp:
        assert t.extra["dp_rank"] == int(t.request_id) % nproc
        assert dataclasses.replace(t, extra={}).equals(one[t.request_id]), t.request_id


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 3])
def test_nproc_runs_many_times_and_equals_one_process(tmp_path, nproc):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"p{i}\n" for i in range(nproc)))
    one = _one_process(tmp_path, prompts)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    for i in range(RUNS):
        out = tmp_path / f"dp{i}"
        if i < FRESH:
            r = _capture("--prompts", prompts, "--out", out, "--nproc", nproc)
            assert r.returncode == 0, f"run {i}: exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr}"
            assert "terminate called" not in r.stderr and "Traceback" not in r.stderr, r.stderr
            assert r.stdout.count(f"wrote {nproc} traces") == 1  # rank 0 reports
        else:
            r = _capture_here("--prompts", prompts, "--out", out, "--nproc", nproc)
            assert r.exit_code == 0, f"run {i}: exit {r.exit_code}\n{r.output[-2000:]}"
        _equal_to_one(out, one, nproc)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    print(f"\n--nproc {nproc} x {RUNS}: {time.monotonic() - t0:.0f} s wall, {cpu:.0f} s CPU "
          "(of the fresh runs' processes)")


@pytest.mark.distributed
def test_overwrite_of_a_data_parallel_capture_leaves_no_rank_shard(tmp_path):
    """`--overwrite` over a folder written by `--nproc 2` used to keep the old rank* shards, and
    `show` served the stale traces."""
    from typer.testing import CliRunner

    from routecap.cli import app

    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\nc\n")
    out = tmp_path / "o"
    r = _capture("--prompts", prompts, "--out", out, "--nproc", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(list(out.glob("rank*.safetensors"))) == 2
    prompts.write_text("x\n")
    r = CliRunner().invoke(app, [*ARGS, "--prompts", str(prompts), "--out", str(out),
                                 "--overwrite"])
    assert r.exit_code == 0, r.stderr
    assert not list(out.glob("rank*"))
    assert open_traces(out).request_ids() == ["0"]
    assert json.loads((out / "summary.json").read_text())["num_requests"] == 1


@pytest.mark.distributed
@pytest.mark.parametrize("dispatch", ["local", "gathered"])
def test_no_process_group_thread_outlives_the_capture(tmp_path, dispatch):
    """The teardown race's cause: `destroy_process_group` left gloo's threads running (the group
    was still referenced through the capturer's cycles) until interpreter finalization, where a
    gloo thread needing the GIL aborts the process (`terminate called without an active
    exception`, exit -6). After the job, no thread of the group may be left."""
    from distributed.launch import run_ranks

    outs = run_ranks(Path(__file__).parent / "teardown_worker.py", [str(tmp_path / "o"), dispatch],
                     2, timeout=600)
    for o in outs:
        assert "threads after the job" in o.stdout, o.stdout
    assert sorted(open_traces(tmp_path / "o").request_ids()) == ["0", "1", "2"]


def _exit_on_rank(bad_rank: int, code: int) -> None:
    if int(os.environ["RANK"]) == bad_rank:
        sys.exit(code)


def _raise_on_rank(bad_rank: int) -> None:
    if int(os.environ["RANK"]) == bad_rank:
        raise ValueError(f"rank {bad_rank} cannot go on")


@pytest.mark.distributed
def test_a_failed_function_rank_is_reported_with_its_exit_code_and_error():
    from routecap.launch import launch

    assert launch(_exit_on_rank, 2, args=(5, 3)) == {}  # no such rank: every rank exits 0
    (failure,) = launch(_exit_on_rank, 2, args=(1, 3)).items()
    assert failure[0] == 1 and failure[1].exitcode == 3
    ((rank, f),) = launch(_raise_on_rank, 2, args=(0,)).items()
    assert rank == 0 and f.exitcode == 1
    assert "ValueError: rank 0 cannot go on" in f.message


def test_the_ranks_get_the_converted_arguments(tmp_path, monkeypatch):
    """The ranks call capture() with the launching process's converted values (enums as enums:
    on the GPU machine's typer, click's ctx.params held the raw strings and every rank died with
    AttributeError: 'str' object has no attribute 'value')."""
    import inspect

    from typer.testing import CliRunner

    from routecap import cli, launch

    seen = {}

    def fake_launch(entry, nproc, *, args, **kw):
        seen.update(entry=entry, nproc=nproc, args=args)
        return {2: launch.RankFailure(exitcode=1, message="ValueError: lost")}

    monkeypatch.setattr(launch, "launch", fake_launch)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n")
    r = CliRunner().invoke(cli.app, [*ARGS, "--prompts", str(prompts), "--out",
                                     str(tmp_path / "o"), "--nproc", "2", "--dispatch",
                                     "gathered", "--prompts-format", "text"])
    assert seen["entry"] is launch.cli_rank and seen["nproc"] == 2
    command, params = seen["args"]
    assert command == "capture"
    assert list(params) == list(inspect.signature(cli.capture).parameters)
    assert params["dispatch"] is cli.Dispatch.gathered
    assert params["prompts_format"] is cli.PromptFormat.text
    assert params["out_dir"] == tmp_path / "o" and params["nproc"] == 2
    # a rank that died of an exception (a bug, not bad input): its error in one line, exit 1
    assert r.exit_code == 1
    assert r.stderr.strip() == "error: rank 2 failed (exit code 1): ValueError: lost", r.stderr


@pytest.mark.distributed
def test_a_failed_rank_of_a_capture_exits_2_with_one_line(tmp_path, monkeypatch):
    """The rank says what went wrong in one line; the launching command then exits 2 too."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n")
    r = _capture("--prompts", prompts, "--out", tmp_path / "o", "--nproc", "2",
                 "--model", tmp_path / "no-such-model")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "no-such-model" in r.stderr, r.stderr
