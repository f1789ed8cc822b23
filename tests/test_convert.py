"""routecap convert: trace files <-> wire / SGLang / vLLM JSONL, without losing a route."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from routecap.convert import ConvertError, RouterShape, convert, guess_format, read_records
from routecap.files import TraceWriter, open_traces
from routecap.trace import RoutingTrace

SHAPE = RouterShape(num_layers=5, moe_layers=(1, 2, 4), num_experts=32, top_k=4)


def traces():
    rng = np.random.default_rng(0)
    out = []
    for i, (T, start) in enumerate([(6, 0), (3, 4), (0, 0)]):
        ids = np.array([rng.permutation(32)[:4] for _ in range(T * 3)], np.int64).reshape(T, 3, 4)
        miss = None
        if i == 1:
            miss = np.zeros((T, 3), bool)
            miss[1, 2] = True
        out.append(RoutingTrace.from_ids(ids, num_experts=32, moe_layers=[1, 2, 4],
                                         request_id=f"r{i}", prompt_len=5, start=start,
                                         missing=miss))
    return out


@pytest.fixture
def folder(tmp_path):
    with TraceWriter(tmp_path / "src") as w:
        w.extend(traces())
    return tmp_path / "src"


def _same_routes(a, b):
    assert (a.request_id, a.start, a.prompt_len, a.num_tokens) == (
        b.request_id, b.start, b.prompt_len, b.num_tokens)
    assert np.array_equal(a.to_numpy(), b.to_numpy())


@pytest.mark.parametrize("fmt", ["wire", "sglang", "vllm"])
def test_roundtrip_through_each_format(tmp_path, folder, fmt):
    mid = tmp_path / f"x.{fmt}.jsonl"
    assert convert(folder, mid, src_format="trace", dst_format=fmt, shape=SHAPE) == 3
    assert guess_format(mid) == fmt
    back = tmp_path / "back"
    assert convert(mid, back, src_format=fmt, dst_format="trace", shape=SHAPE) == 3
    for a, b in zip(traces(), open_traces(back)):
        _same_routes(a, b)
        if fmt == "wire":  # the codec carries everything
            assert dataclasses.replace(b, extra=a.extra).equals(a)


def test_engine_formats_need_the_router_shape(tmp_path, folder):
    mid = tmp_path / "x.jsonl"
    convert(folder, mid, src_format="trace", dst_format="sglang", shape=SHAPE)
    with pytest.raises(ConvertError, match="needs the model's router shape"):
        list(read_records(mid, "sglang"))


def test_bad_records_name_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"routecap": "AAAA"}\n')
    with pytest.raises(ConvertError, match="bad.jsonl:1: cannot read a wire record"):
        list(read_records(p, "wire"))
    p.write_text("not json\n")
    with pytest.raises(ConvertError, match="bad.jsonl:1: not JSON"):
        list(read_records(p, "wire"))
    with pytest.raises(ConvertError, match="cannot tell its format"):
        guess_format(p)
    with pytest.raises(ConvertError, match="no such file"):
        list(read_records(tmp_path / "none.jsonl", "vllm", SHAPE))


def test_shape_from_a_model_config(tmp_path):
    from tiny_models import tiny_config

    cfg = tiny_config("deepseek_v3")
    cfg.save_pretrained(tmp_path)
    s = RouterShape.from_config(tmp_path / "config.json")
    assert (s.num_layers, s.moe_layers, s.num_experts, s.top_k) == (3, (1, 2), 16, 4)
    json.loads((tmp_path / "config.json").read_text())
