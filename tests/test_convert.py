"""routecap convert: trace files <-> wire / SGLang / vLLM JSONL, without losing a route."""

from __future__ import annotations

import dataclasses
import json
import re

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


def _vllm_line(ids, **fields):
    import base64
    import io

    buf = io.BytesIO()
    np.save(buf, np.asarray(ids, np.int32))
    return json.dumps({"request_id": "a", "routed_experts": base64.b64encode(buf.getvalue())
                       .decode(), "prompt_len": 3, **fields}) + "\n"


def _good_ids(T=4, K=4):
    rng = np.random.default_rng(1)
    ids = np.zeros((T, 5, K), np.int32)
    for t in range(T):
        for layer in (1, 2, 4):
            ids[t, layer] = rng.permutation(32)[:K]
    return ids


@pytest.mark.parametrize("fields,ids,text", [
    ({"prompt_len": 3.7}, None, "field 'prompt_len': expected a non-negative integer, got 3.7"),
    ({"start": 1e30}, None, "field 'start': expected a non-negative integer, got 1e+30"),
    ({"start": -1}, None, "field 'start': expected a non-negative integer, got -1"),
    ({"request_id": None}, None, "field 'request_id': expected a string (or integer) request id, "
                                 "got None"),
    ({}, "k2", "the record has K=2 experts per token, the router shape says top-k 4"),
])
def test_loose_vllm_records_are_refused(tmp_path, fields, ids, text):
    """Each was accepted before: 3.7 became 3, null became "None", K=2 became a K=2 trace."""
    p = tmp_path / "v.jsonl"
    p.write_text(_vllm_line(_good_ids()) + _vllm_line(_good_ids(K=2) if ids else _good_ids(),
                                                      **{"request_id": "b", **fields}))
    with pytest.raises(ConvertError, match=re.escape(f"v.jsonl:2: {text}")):
        list(read_records(p, "vllm", SHAPE))


def test_loose_sglang_records_are_refused(tmp_path, folder):
    mid = tmp_path / "s.jsonl"
    convert(folder, mid, src_format="trace", dst_format="sglang", shape=SHAPE)
    rec = json.loads(mid.read_text().splitlines()[0])
    for change, text in [({"prompt_tokens": 5.5}, "field 'prompt_tokens'"),
                         ({"id": None}, "field 'id'"),
                         ({"routed_experts_start_len": 1e30}, "field 'routed_experts_start_len'")]:
        mid.write_text(json.dumps({**rec, **change}) + "\n")
        with pytest.raises(ConvertError, match=f"s.jsonl:1: {text}"):
            list(read_records(mid, "sglang", SHAPE))


def test_an_empty_input_is_an_error(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n\n")
    with pytest.raises(ConvertError, match="holds no vllm record"):
        convert(p, tmp_path / "out", src_format="vllm", dst_format="trace", shape=SHAPE)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dst_fmt", ["trace", "wire"])
def test_a_bad_record_leaves_the_destination_as_it_was(tmp_path, dst_fmt):
    """A bad line 3 used to leave 2 traces in a trace folder, or a .part.jsonl.tmp beside JSONL."""
    p = tmp_path / "v.jsonl"
    p.write_text(_vllm_line(_good_ids()) + _vllm_line(_good_ids(), request_id="b")
                 + _vllm_line(_good_ids(), request_id="c", prompt_len="x"))
    dst = tmp_path / ("out" if dst_fmt == "trace" else "out.jsonl")
    with pytest.raises(ConvertError, match="v.jsonl:3"):
        convert(p, dst, src_format="vllm", dst_format=dst_fmt, shape=SHAPE)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["v.jsonl"]  # nothing beside it
    # over an existing destination: it stays as it was
    convert(_ok(tmp_path), dst, src_format="vllm", dst_format=dst_fmt, shape=SHAPE)
    before = _snapshot(dst)
    with pytest.raises(ConvertError, match="v.jsonl:3"):
        convert(p, dst, src_format="vllm", dst_format=dst_fmt, shape=SHAPE, overwrite=True)
    assert _snapshot(dst) == before
    assert not [x for x in tmp_path.iterdir() if x.name.endswith(".tmp")]


def _ok(tmp_path):
    p = tmp_path / "ok.jsonl"
    p.write_text(_vllm_line(_good_ids(), request_id="z"))
    return p


def _snapshot(dst):
    if dst.is_dir():
        return {x.name: x.read_bytes() for x in dst.iterdir() if x.name != ".routecap.lock"}
    return dst.read_bytes()


@pytest.mark.parametrize("dst_fmt", ["trace", "wire"])
def test_convert_into_its_own_source_is_refused(tmp_path, folder, dst_fmt):
    """`convert D D --to trace --overwrite` used to delete D's traces before reading them."""
    before = _snapshot(folder)
    dst = folder if dst_fmt == "trace" else folder / "x.jsonl"
    with pytest.raises(ConvertError, match="is the source .* or inside it"):
        convert(folder, dst, src_format="trace", dst_format=dst_fmt, shape=SHAPE, overwrite=True)
    assert _snapshot(folder) == before


def test_zero_token_records_round_trip(tmp_path):
    """A record with no routed token (T=0) used to end in a TypeError from memoryview.cast."""
    p = tmp_path / "v.jsonl"
    p.write_text(_vllm_line(np.zeros((0, 5, 4), np.int32)))
    assert convert(p, tmp_path / "t", src_format="vllm", dst_format="trace", shape=SHAPE) == 1
    (t,) = list(open_traces(tmp_path / "t"))
    assert t.num_tokens == 0 and t.request_id == "a" and t.prompt_len == 3
    assert convert(tmp_path / "t", tmp_path / "back.jsonl", src_format="trace",
                   dst_format="vllm", shape=SHAPE) == 1
    (back,) = list(read_records(tmp_path / "back.jsonl", "vllm", SHAPE))
    assert back.num_tokens == 0


@pytest.mark.parametrize("mode", ["entropy", "set", "order"])
def test_wire_mode_picks_the_codec_mode(tmp_path, folder, mode):
    import base64

    from routecap import codec

    mid = tmp_path / "x.jsonl"
    assert convert(folder, mid, src_format="trace", dst_format="wire", wire_mode=mode) == 3
    recs = [json.loads(line) for line in mid.read_text().splitlines()]
    stored = {codec.inspect(base64.b64decode(r["routecap"]))["routes"]["mode"] for r in recs[:2]}
    # tiny traces: the codec may keep raw ids + zstd when that is smaller, never another mode
    assert stored <= {mode, "raw"}, stored
    for a, b in zip(traces(), read_records(mid, "wire")):
        want = a.with_sorted_topk() if mode in codec.SET_MODES else a
        assert np.array_equal(b.to_numpy(), want.to_numpy())
        assert b.topk_order == want.topk_order


def test_wire_mode_applies_to_wire_output_only(tmp_path, folder):
    with pytest.raises(ConvertError, match="applies to wire output only, not sglang"):
        convert(folder, tmp_path / "x.jsonl", src_format="trace", dst_format="sglang",
                shape=SHAPE, wire_mode="entropy")
    with pytest.raises(ConvertError, match="unknown wire mode 'zip'"):
        convert(folder, tmp_path / "x.jsonl", src_format="trace", dst_format="wire",
                wire_mode="zip")


def test_the_cli_offers_every_codec_mode():
    from routecap import codec
    from routecap.cli import WireMode

    assert tuple(m.value for m in WireMode) == codec.MODES
