"""The command line, as a user meets it: the README's main job, wrong arguments, bad files."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from test_tracefolder import fail_at_shard

from routecap.files import open_traces

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "routecap", *args], capture_output=True,
                          text=True, cwd=cwd)


def quick_start_commands():
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## Quick start\n(.*?)^## ", text, re.S | re.M)
    assert m, "README.md has no Quick start section"
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", m.group(1), re.S)
    return [ln.split("#")[0].strip() for ln in block.group(1).splitlines() if ln.strip()]


def make_recipe(target):
    text = (ROOT / "Makefile").read_text()
    m = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", text, re.M)
    return [ln.strip() for ln in m.group(1).splitlines()]


def test_readme_starts_with_two_quick_start_commands():
    text = (ROOT / "README.md").read_text()
    first_section = re.search(r"^## (.*)$", text, re.M).group(1)
    assert first_section == "Quick start"
    assert quick_start_commands() == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    # the whole suite, slow part included, on every core
    assert make_recipe("test")[0] == "$(VENV)/bin/python -m pytest -q -m \"\" -n auto"


def test_readme_main_job_writes_traces_and_summary(tmp_path):
    (cmd,) = make_recipe("demo")
    argv = shlex.split(cmd.replace("$(OUT)", str(tmp_path / "demo")))
    assert argv[0] == "$(VENV)/bin/routecap" and argv[1] == "capture"
    r = run(*argv[1:])
    assert r.returncode == 0, r.stderr
    out = tmp_path / "demo"
    summary = json.loads((out / "summary.json").read_text())
    prompts = [ln for ln in (ROOT / "examples" / "prompts.txt").read_text().splitlines() if ln]
    assert summary["num_requests"] == len(prompts)
    assert summary["moe_layers"] == [1, 2, 3] and summary["num_experts"] == 16
    assert summary["top_k"] == 4 and summary["num_missing"] == 0
    traces = open_traces(out)
    assert traces.complete and len(traces) == len(prompts)
    assert sum(t.num_tokens for t in traces) == summary["num_tokens"]
    for t in traces:
        assert t.num_tokens >= t.prompt_len and t.model == "builtin:tiny-qwen3-moe"
        assert t.token_ids is not None and t.missing is None
    assert f"requests      │ {len(prompts)}" in r.stdout
    assert "load imbalance per MoE layer" in r.stdout
    for layer in summary["layers"]:
        assert sum(layer["counts"]) == summary["num_tokens"] * 4

    # the same summary from `show`, and one request token by token
    r = run("show", str(out), "--json")
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["layers"] == summary["layers"]
    r = run("show", str(out), "--request", "3", "--limit", "2")
    assert r.returncode == 0 and "request '3'" in r.stdout and "more rows" in r.stdout


def test_capture_token_ids_jsonl_and_refuses_to_overwrite(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "x", "input_ids": [5, 6, 7]}\n"plain text"\n{"prompt": "hi", "id": "y"}\n')
    out = tmp_path / "o"
    r = run("capture", "--model", "builtin:tiny-qwen3-moe", "--prompts", str(p),
            "--max-new-tokens", "3", "--out", str(out), "--batch-size", "2", "--sample", "--seed", "3")
    assert r.returncode == 0, r.stderr
    ts = open_traces(out)
    assert ts.request_ids() == ["x", "1", "y"]
    assert ts.get("x").token_ids[:3].tolist() == [5, 6, 7]
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    r = run("capture", "--model", "builtin:tiny-qwen3-moe", "--prompts", str(p), "--out", str(out))
    assert r.returncode == 2 and "already holds a committed capture" in r.stderr
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # nothing lost


@pytest.mark.parametrize(
    "args,text",
    [
        (["capture", "--prompts", "x", "--out", "y"], "Missing option '--model'"),
        (["capture", "--model", "builtin:nope", "--prompts", "examples/prompts.txt", "--out", "{tmp}"],
         "unknown built-in model 'builtin:nope'"),
        (["capture", "--model", "builtin:tiny-qwen3-moe", "--prompts", "missing.txt", "--out",
          "{tmp}"], "prompts file missing.txt not found"),
        (["capture", "--model", "{tmp}", "--prompts", "examples/prompts.txt", "--out", "{tmp}/o"],
         "no config.json in it"),
        (["capture", "--model", "builtin:tiny-qwen3-moe", "--prompts", "examples/prompts.txt",
          "--out", "{tmp}", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["show", "{tmp}/none"], "no such file or folder"),
        (["show", "{tmp}"], "no manifest.json and no trace shards"),
    ],
)
def test_wrong_arguments_get_clear_errors(tmp_path, args, text):
    r = run(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert r.returncode == 2
    assert text in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_show_corrupt_and_unknown_request(tmp_path):
    out = tmp_path / "d"
    r = cli("capture", "--model", "builtin:tiny-qwen3-moe", "--prompts", "examples/prompts.txt",
            "--max-new-tokens", "2", "--out", out)
    assert r.exit_code == 0, r.output
    r = run("show", str(out), "--request", "nope")
    assert r.returncode == 2 and "request 'nope' is not in these traces" in r.stderr
    (shard,) = out.glob("traces-*-00000.safetensors")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    r = run("show", str(out))
    assert r.returncode == 2 and "differs from the manifest" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_version():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("routecap ")


@pytest.mark.distributed
@pytest.mark.parametrize("dispatch", ["local", "gathered"])
def test_capture_data_parallel_matches_single_process(tmp_path, dispatch):
    import dataclasses

    args = ["capture", "--model", "builtin:tiny-qwen3-moe", "--prompts", "examples/prompts.txt",
            "--max-new-tokens", "4", "--batch-size", "4"]
    # in this process (its launcher's fork server serves every launch of the session); a fresh
    # `routecap --nproc` process is tests/distributed/test_launch.py's
    assert cli(*args, "--out", tmp_path / "one").exit_code == 0
    r = cli(*args, "--out", tmp_path / "dp", "--nproc", "2", "--dispatch", dispatch)
    assert r.exit_code == 0, r.output
    one = {t.request_id: t for t in open_traces(tmp_path / "one")}
    dp = open_traces(tmp_path / "dp")
    run_id = dp.run_id
    assert sorted(p.name for p in dp.shards) == [f"rank00000-{run_id}-00000.safetensors",
                                                  f"rank00001-{run_id}-00000.safetensors"]
    got = {t.request_id: t for t in dp}
    assert sorted(got) == sorted(one)
    for rid, t in got.items():
        assert t.extra["dp_rank"] == int(rid) % 2
        assert dataclasses.replace(t, extra={}).equals(one[rid])
    s_one = json.loads((tmp_path / "one" / "summary.json").read_text())
    s_dp = json.loads((tmp_path / "dp" / "summary.json").read_text())
    assert s_dp["layers"] == s_one["layers"] and s_dp["nproc"] == 2


def test_dispatch_needs_several_processes(tmp_path):
    r = run("capture", "--model", "builtin:tiny-qwen3-moe", "--prompts", "examples/prompts.txt",
            "--out", str(tmp_path), "--dispatch", "gathered")
    assert r.returncode == 2 and "needs several processes (--nproc N, N > 1)" in r.stderr


def test_doctor_reports_versions_and_the_vllm_fix():
    r = run("doctor")
    assert r.returncode == 0, r.stderr
    for part in ("routecap", "torch", "transformers", "codec kernels", "vLLM"):
        assert part in r.stdout


def test_convert_cli(tmp_path):
    out = tmp_path / "d"
    assert cli("capture", "--model", "builtin:tiny-qwen3-moe", "--prompts", "examples/prompts.txt",
               "--max-new-tokens", "2", "--out", out).exit_code == 0
    shape = ["--num-layers", "4", "--moe-layers", "1,2,3", "--num-experts", "16", "--top-k", "4"]
    r = run("convert", str(out), str(tmp_path / "s.jsonl"), "--to", "sglang", *shape)
    assert r.returncode == 0 and "converted 12 traces" in r.stdout, r.stderr
    r = run("convert", str(tmp_path / "s.jsonl"), str(tmp_path / "back"), "--to", "trace", *shape)
    assert r.returncode == 0, r.stderr
    a = {t.request_id: t.to_numpy() for t in open_traces(out)}
    b = {t.request_id: t.to_numpy() for t in open_traces(tmp_path / "back")}
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    r = run("convert", str(tmp_path / "s.jsonl"), str(tmp_path / "x"), "--to", "trace")
    assert r.returncode == 2 and "needs the model's router shape" in r.stderr
    r = run("convert", str(tmp_path / "s.jsonl"), str(tmp_path / "x"), "--to", "trace",
            "--num-layers", "4")
    assert r.returncode == 2 and "give all of --num-layers" in r.stderr
    r = run("convert", str(out), str(tmp_path / "s.jsonl"), "--to", "wire")
    assert r.returncode == 2 and "exists; pass --overwrite" in r.stderr


# ---- faults a real cluster produces: one line, exit 2, earlier data intact ---------------------
# These run the command in this process (typer's CliRunner) so that a fault can be injected and
# the tiny model needs no new interpreter.
def cli(*args):
    from typer.testing import CliRunner

    from routecap.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r


def one_line_error(r, text):
    assert r.exit_code == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert text in lines[0], r.stderr


TINY = ["--model", "builtin:tiny-qwen3-moe", "--max-new-tokens", "2", "--batch-size", "2",
        "--shard-requests", "2"]


@pytest.fixture
def prompts6(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("hello world\nthe cat\nfoo bar baz\nabc\nxyz\nlast one\n")
    return p


def snapshot(folder):
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.name != ".routecap.lock"}


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the model is loaded (checks must come first)."""
    from routecap import capture_job

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(capture_job, "load_model", refuse)


def test_a_second_writer_is_refused_before_the_model_loads(tmp_path, prompts6, no_model):
    """Two captures into one --out used to both exit 0 with one folder mixing both runs."""
    from routecap.folderlock import FolderLock

    with FolderLock(tmp_path / "o", run_id="first"):
        r = cli("capture", *TINY, "--prompts", prompts6, "--out", tmp_path / "o")
    one_line_error(r, f"being written by another routecap process (pid {os.getpid()} on host")
    assert "run first" in r.stderr


@pytest.mark.parametrize("args,text", [
    (["--sample", "--temperature", "0"], "--sample needs --temperature > 0, got 0.0"),
    (["--sample", "--top-p", "0"], "--sample needs --top-p > 0"),
    (["--overwrite", "--resume"], "--overwrite and --resume exclude each other"),
])
def test_arguments_checked_before_the_model_loads(tmp_path, prompts6, no_model, args, text):
    one_line_error(cli("capture", *TINY, "--prompts", prompts6, "--out", tmp_path / "o", *args),
                   text)


def test_prompt_ids_checked_against_the_vocabulary_first(tmp_path, no_model):
    p = tmp_path / "ids.txt"
    p.write_text("5 6 7\n5 999999\n")
    r = cli("capture", *TINY, "--prompts", p, "--prompts-format", "ids", "--out", tmp_path / "o")
    one_line_error(r, "request '1': token id 999999 is outside the model's vocabulary of")


def test_out_under_a_file_and_a_missing_parent(tmp_path, prompts6):
    (tmp_path / "f").write_text("x")
    one_line_error(cli("capture", *TINY, "--prompts", prompts6, "--out", tmp_path / "f"),
                   "exists and is not a folder")
    one_line_error(cli("capture", *TINY, "--prompts", prompts6, "--out", tmp_path / "f" / "o"),
                   "a part of the path is a file, not a folder")
    r = cli("capture", *TINY, "--prompts", prompts6, "--out", tmp_path / "new" / "deep" / "o")
    assert r.exit_code == 0, r.stderr  # parents are made
    assert len(open_traces(tmp_path / "new" / "deep" / "o")) == 6


@pytest.mark.parametrize("err_no,text", [(28, "no space left on the device"),
                                          (30, "the file system is read-only")])
def test_full_or_read_only_disk_mid_overwrite(tmp_path, prompts6, monkeypatch, err_no, text):
    """ENOSPC / EROFS at the second shard of an overwrite: one line, exit 2, the old capture
    exactly as it was (the old one used to be deleted before the new run started)."""
    out = tmp_path / "o"
    assert cli("capture", *TINY, "--prompts", prompts6, "--out", out).exit_code == 0
    before = snapshot(out)
    fail_at_shard(monkeypatch, 2, err_no)
    r = cli("capture", *TINY, "--prompts", prompts6, "--out", out, "--overwrite", "--seed", "5")
    one_line_error(r, text)
    assert snapshot(out) == before


def test_a_killed_capture_resumes_to_the_same_folder(tmp_path, prompts6, monkeypatch):
    """A capture that dies (here: the disk fills at its third shard) keeps what it finished;
    `show` says it is unfinished; `--resume` finishes it and the result equals a run that was
    never interrupted, cell by cell."""
    whole = tmp_path / "whole"
    assert cli("capture", *TINY, "--prompts", prompts6, "--out", whole).exit_code == 0
    out = tmp_path / "o"
    fail_at_shard(monkeypatch, 3)
    one_line_error(cli("capture", *TINY, "--prompts", prompts6, "--out", out),
                   "no space left on the device")
    monkeypatch.undo()
    r = cli("show", out, "--json")
    assert r.exit_code == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["capture"]["complete"] is False and shown["num_requests"] == 4
    assert "did not finish" not in r.stderr  # --json prints JSON only
    one_line_error(cli("capture", *TINY, "--prompts", prompts6, "--out", out),
                   "already holds an unfinished capture")
    one_line_error(cli("capture", *TINY, "--prompts", prompts6, "--out", out, "--resume",
                       "--max-new-tokens", "3"), "differ in max_new_tokens: 2 there, 3 now")
    r = cli("capture", *TINY, "--prompts", prompts6, "--out", out, "--resume")
    assert r.exit_code == 0, r.stderr
    assert "4 were already written and kept" in r.stdout
    assert_same_traces(out, whole)
    r = cli("show", out, "--json")
    assert json.loads(r.stdout)["capture"] == {
        "complete": True, "source": "manifest", "run_id": open_traces(out).run_id, "shards": 3,
        "verified": "every shard matches its SHA-256"}
    r = cli("capture", *TINY, "--prompts", prompts6, "--out", out, "--resume")
    assert r.exit_code == 0 and "nothing to resume" in r.stdout


def assert_same_traces(a, b):
    ta = {t.request_id: t for t in open_traces(a)}
    tb = {t.request_id: t for t in open_traces(b)}
    assert sorted(ta) == sorted(tb) and ta
    for rid in ta:
        assert ta[rid].equals(tb[rid]), rid
    sa = json.loads((a / "summary.json").read_text())
    sb = json.loads((b / "summary.json").read_text())
    assert sa["layers"] == sb["layers"] and sa["num_tokens"] == sb["num_tokens"]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from routecap.builtin import load_builtin

    d = tmp_path_factory.mktemp("model")
    model, tok = load_builtin("builtin:tiny-qwen3-moe")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _copy_model(src, dst, *, tokenizer=True):
    import shutil

    shutil.copytree(src, dst)
    if not tokenizer:
        for f in dst.iterdir():
            if "token" in f.name:
                f.unlink()
    return dst


def test_corrupt_model_files_are_one_line_errors_before_loading(tmp_path, model_folder, prompts6,
                                                                no_model):
    m = _copy_model(model_folder, tmp_path / "trunc")
    (w,) = m.glob("*.safetensors")
    w.write_bytes(w.read_bytes()[:-100])
    one_line_error(cli("capture", *TINY, "--model", m, "--prompts", prompts6, "--out",
                       tmp_path / "o"), "is truncated or corrupt")
    m = _copy_model(model_folder, tmp_path / "index")
    (m / "model.safetensors.index.json").write_text('{"weight_map": [1, 2')
    one_line_error(cli("capture", *TINY, "--model", m, "--prompts", prompts6, "--out",
                       tmp_path / "o"), "malformed weight index model.safetensors.index.json")
    (m / "model.safetensors.index.json").write_text('{"weight_map": {"a": "gone.safetensors"}}')
    one_line_error(cli("capture", *TINY, "--model", m, "--prompts", prompts6, "--out",
                       tmp_path / "o"), "names weight file 'gone.safetensors', which is not")
    assert not (tmp_path / "o").exists()


def test_token_id_prompts_need_no_tokenizer(tmp_path, model_folder, prompts6):
    """A model folder without a tokenizer was refused even for token-id prompts, with a
    misleading message ("the prompt tokenizes to nothing")."""
    m = _copy_model(model_folder, tmp_path / "notok", tokenizer=False)
    p = tmp_path / "ids.txt"
    p.write_text("5 6 7\n8 9\n")
    r = cli("capture", *TINY, "--model", m, "--prompts", p, "--prompts-format", "ids",
            "--out", tmp_path / "o")
    assert r.exit_code == 0, r.stderr
    ts = open_traces(tmp_path / "o")
    assert ts.get("0").token_ids[:3].tolist() == [5, 6, 7]
    one_line_error(cli("capture", *TINY, "--model", m, "--prompts", prompts6, "--out",
                       tmp_path / "o2"), "a text prompt needs a tokenizer and the model folder has "
                   "none")


def test_error_text_keeps_its_brackets(tmp_path):
    """rich markup used to eat "[token 0, layer 1]" from the message meant to locate bad data."""
    import base64
    import io

    import numpy as np

    ids = np.zeros((2, 4, 2), np.int32)
    ids[:, 1:] = [3, 5]
    ids[0, 1] = [3, 3]  # a repeated expert id at token 0, layer 1
    buf = io.BytesIO()
    np.save(buf, ids)
    p = tmp_path / "v.jsonl"
    p.write_text(json.dumps({"request_id": "a", "routed_experts": base64.b64encode(
        buf.getvalue()).decode(), "prompt_len": 1}) + "\n")
    r = cli("convert", p, tmp_path / "t", "--to", "trace", "--num-layers", "4", "--moe-layers",
            "1,2,3", "--num-experts", "16", "--top-k", "2")
    one_line_error(r, "[3, 3] at [token 0, layer 0]")


def test_convert_into_its_source_is_refused(tmp_path, prompts6):
    out = tmp_path / "o"
    assert cli("capture", *TINY, "--prompts", prompts6, "--out", out).exit_code == 0
    before = snapshot(out)
    one_line_error(cli("convert", out, out, "--to", "trace", "--overwrite"),
                   "is the source")
    assert snapshot(out) == before


@pytest.mark.slow
def _capture_quietly(argv):
    """``routecap ARGV`` in this (forked) process, its output dropped."""
    from routecap.cli import app

    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
    app(args=argv)


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    """A capture SIGKILLed ten times at random moments (while shards, journals, the manifest and
    summary are being written), each time restarted with --resume: every intermediate folder
    reads back only right traces, and the finished one equals a run never interrupted."""
    import multiprocessing
    import random
    import signal
    import time

    from routecap.launch import PRELOAD

    n = 16
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(n)))
    args = ["capture", "--model", "builtin:tiny-qwen3-moe", "--max-new-tokens", "2",
            "--batch-size", "1", "--shard-requests", "1", "--prompts", str(prompts)]
    assert cli(*args, "--out", tmp_path / "whole").exit_code == 0
    whole = {t.request_id: t for t in open_traces(tmp_path / "whole")}
    out = tmp_path / "o"
    rng = random.Random(7)
    targets = sorted(rng.sample(range(0, n - 2), 11))  # kill once this many shards are written
    kills = 0

    def written():
        try:
            return len(open_traces(out).request_ids())
        except Exception:  # noqa: BLE001 -- not created yet, or between two renames
            return -1

    # each capture is a process of its own, forked from a server that imported routecap, torch
    # and transformers once (not a fresh interpreter each time: the kills land in the capture,
    # not in its imports)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    for target in targets:
        p = ctx.Process(target=_capture_quietly, args=([*args, "--out", str(out), "--resume"],))
        p.start()
        while p.is_alive() and written() < target:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))  # anywhere within the next shard's write
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
            kills += 1
        p.join()
        if out.exists() and any(out.glob("*.json")):
            for t in open_traces(out):  # what survived is right, or not there
                assert t.equals(whole[t.request_id]), t.request_id
    r = run(*args, "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    assert kills >= 10
    assert_same_traces(out, tmp_path / "whole")


def test_convert_wire_mode_entropy(tmp_path):
    """`convert --to wire --wire-mode entropy` writes set-mode rows (order dropped) that read back."""
    import base64

    import numpy as np

    from routecap import codec
    from routecap.files import TraceWriter
    from routecap.trace import RoutingTrace

    rng = np.random.default_rng(0)
    # skewed routes: each row is 4 of experts 0-5 (of 16), in a random order
    ids = np.argsort(rng.random((400 * 2, 16)) - (np.arange(16) < 6), axis=1)[:, :4]
    ids = ids.reshape(400, 2, 4)
    t = RoutingTrace.from_ids(ids, num_experts=16, moe_layers=[1, 2], request_id="a",
                              prompt_len=400)
    with TraceWriter(tmp_path / "d") as w:
        w.append(t)
    r = cli("convert", tmp_path / "d", tmp_path / "w.jsonl", "--to", "wire", "--wire-mode",
            "entropy")
    assert r.exit_code == 0, r.stderr
    (rec,) = [json.loads(x) for x in (tmp_path / "w.jsonl").read_text().splitlines()]
    blob = base64.b64decode(rec["routecap"])
    assert codec.inspect(blob)["routes"]["mode"] == "entropy"
    assert codec.decode(blob).equals(t.with_sorted_topk())
    r = cli("convert", tmp_path / "d", tmp_path / "s.jsonl", "--to", "sglang", "--wire-mode",
            "set", "--num-layers", "3", "--moe-layers", "1,2", "--num-experts", "16", "--top-k", "4")
    one_line_error(r, "applies to wire output only, not sglang")
