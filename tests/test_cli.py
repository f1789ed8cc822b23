"""The command line, as a user meets it: the README's main job, wrong arguments, bad files."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert make_recipe("test")[0] == "$(VENV)/bin/python -m pytest -q"  # the whole suite


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
    before = (out / "traces-00000.safetensors").read_bytes()
    r = run("capture", "--model", "builtin:tiny-qwen3-moe", "--prompts", str(p), "--out", str(out))
    assert r.returncode == 2 and "already holds a capture" in r.stderr
    assert (out / "traces-00000.safetensors").read_bytes() == before  # nothing lost


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
        (["show", "{tmp}"], "no trace shards"),
    ],
)
def test_wrong_arguments_get_clear_errors(tmp_path, args, text):
    r = run(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert r.returncode == 2
    assert text in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_show_corrupt_and_unknown_request(tmp_path):
    out = tmp_path / "d"
    r = run("capture", "--model", "builtin:tiny-qwen3-moe", "--prompts", "examples/prompts.txt",
            "--max-new-tokens", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    r = run("show", str(out), "--request", "nope")
    assert r.returncode == 2 and "request 'nope' is not in these traces" in r.stderr
    shard = out / "traces-00000.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    r = run("show", str(out))
    assert r.returncode == 2 and "truncated" in r.stderr and "Traceback" not in r.stderr


def test_version():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("routecap ")


@pytest.mark.distributed
@pytest.mark.parametrize("dispatch", ["local", "gathered"])
def test_capture_data_parallel_matches_single_process(tmp_path, dispatch):
    import dataclasses

    args = ["capture", "--model", "builtin:tiny-qwen3-moe", "--prompts", "examples/prompts.txt",
            "--max-new-tokens", "4", "--batch-size", "4"]
    r = run(*args, "--out", str(tmp_path / "one"))
    assert r.returncode == 0, r.stderr
    r = run(*args, "--out", str(tmp_path / "dp"), "--nproc", "2", "--dispatch", dispatch)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("wrote 12 traces") == 1  # rank 0 reports
    one = {t.request_id: t for t in open_traces(tmp_path / "one")}
    dp = open_traces(tmp_path / "dp")
    assert sorted(p.name for p in dp.shards) == ["rank00000-00000.safetensors",
                                                  "rank00001-00000.safetensors"]
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
    assert run("capture", "--model", "builtin:tiny-qwen3-moe", "--prompts", "examples/prompts.txt",
               "--max-new-tokens", "2", "--out", str(out)).returncode == 0
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
