import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from routecap.files import (
    TraceFileError,
    TraceWriter,
    load_file,
    open_traces,
    read_header,
    save_file,
)
from routecap.trace import RoutingTrace, TraceValidationError, validate_trace


def trace(rid, T, *, E=16, L=3, K=4, seed=0, missing=False, tokens=True, start=0):
    rng = np.random.default_rng(seed)
    ids = np.array([rng.permutation(E)[:K] for _ in range(T * L)], np.int64).reshape(T, L, K)
    miss = None
    if missing and T:
        miss = rng.random((T, L)) < 0.3
        miss[0, 0] = True
    return RoutingTrace.from_ids(
        ids, num_experts=E, moe_layers=[1, 3, 4][:L] if L <= 3 else list(range(L)),
        request_id=rid, prompt_len=max(T - 2, 0), start=start, missing=miss, model="m",
        token_ids=np.arange(T, dtype=np.int32) + 7 if tokens else None,
        extra={"dp_rank": 0, "note": rid},
    )


def traces_for(E):
    return [trace("a", 5, E=E, seed=1), trace("empty", 0, E=E), trace("b", 9, E=E, seed=2,
            missing=True), trace("c", 4, E=E, seed=3, tokens=False, start=11)]


@pytest.mark.parametrize("E,dtype", [(16, np.uint8), (256, np.uint8), (300, np.uint16)])
def test_roundtrip_is_byte_exact(tmp_path, E, dtype):
    ts = traces_for(E)
    p = tmp_path / "t.safetensors"
    save_file(ts, p)
    back = load_file(p)
    assert len(back) == len(ts)
    for a, b in zip(ts, back):
        assert b.expert_ids.dtype == dtype
        assert a.equals(b), (a, b)
        validate_trace(b)
    # saving what was loaded gives the same bytes
    p2 = tmp_path / "t2.safetensors"
    save_file(back, p2)
    assert p.read_bytes() == p2.read_bytes()
    assert back[1].num_tokens == 0 and back[2].missing is not None and back[3].token_ids is None


def test_reads_are_memory_mapped_and_read_only(tmp_path):
    p = tmp_path / "t.safetensors"
    save_file(traces_for(16), p)
    t = load_file(p)[0]
    base = t.expert_ids
    while base.base is not None and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, np.memmap)
    assert not t.expert_ids.flags.writeable
    with pytest.raises(ValueError):
        t.expert_ids[0, 0, 0] = 1


def test_file_is_plain_safetensors(tmp_path):
    from safetensors import safe_open

    p = tmp_path / "t.safetensors"
    ts = traces_for(16)
    save_file(ts, p)
    with safe_open(str(p), framework="numpy") as f:
        assert f.metadata()["format"] == "routecap.trace"
        ids = f.get_tensor("expert_ids")
        assert set(f.keys()) == {"expert_ids", "token_ids", "missing.2"}
    assert np.array_equal(ids, np.concatenate([t.expert_ids for t in ts]))
    assert read_header(p).routecap["requests"][0]["request_id"] == "a"


def test_one_model_per_file(tmp_path):
    a = trace("a", 3)
    b = trace("b", 3, E=32)
    with pytest.raises(TraceValidationError, match="num_experts: expected 16 .* got 32 in request 'b'"):
        save_file([a, b], tmp_path / "x.safetensors")
    with pytest.raises(TraceValidationError, match="unique request ids"):
        save_file([a, a], tmp_path / "x.safetensors")
    with pytest.raises(TraceValidationError, match="at least one trace"):
        save_file([], tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.fixture
def good_file(tmp_path):
    p = tmp_path / "good.safetensors"
    save_file(traces_for(16), p)
    return p


def test_truncated_file(tmp_path, good_file):
    data = good_file.read_bytes()
    for cut, text in [(len(data) - 3, "truncated: the header describes"), (5, "truncated"),
                      (0, "truncated"), (20, "corrupt or truncated: the header length says")]:
        p = tmp_path / f"cut{cut}.safetensors"
        p.write_bytes(data[:cut])
        with pytest.raises(TraceFileError, match=text):
            load_file(p)


def test_flipped_data_byte_is_caught(tmp_path, good_file):
    data = bytearray(good_file.read_bytes())
    data[-5] ^= 0x01
    p = tmp_path / "flip.safetensors"
    p.write_bytes(bytes(data))
    with pytest.raises(TraceFileError, match="checksum mismatch in tensor"):
        load_file(p)
    load_file(p, verify=False)  # structure still fine


def test_corrupt_header(tmp_path, good_file):
    data = bytearray(good_file.read_bytes())
    data[8] = ord("#")  # the opening brace of the JSON header
    p = tmp_path / "hdr.safetensors"
    p.write_bytes(bytes(data))
    with pytest.raises(TraceFileError, match="corrupt header"):
        load_file(p)


def _rewrite_meta(src, dst, **changes):
    data = src.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["__metadata__"].update(changes)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    dst.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


def test_wrong_version_and_wrong_format(tmp_path, good_file):
    p = tmp_path / "v2.safetensors"
    _rewrite_meta(good_file, p, format_version="2")
    with pytest.raises(TraceFileError, match="format version 2 is newer than this routecap reads"):
        load_file(p)
    _rewrite_meta(good_file, p, format_version="0")
    with pytest.raises(TraceFileError, match="unsupported format version '0'"):
        load_file(p)
    _rewrite_meta(good_file, p, format="something.else")
    with pytest.raises(TraceFileError, match="not a routecap trace file"):
        load_file(p)
    from safetensors.numpy import save_file as st_save

    st_save({"x": np.zeros(3, np.float32)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(TraceFileError, match="not a routecap trace file"):
        load_file(tmp_path / "plain.safetensors")


def test_header_lies_about_a_request(tmp_path, good_file):
    data = good_file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    rc = json.loads(header["__metadata__"]["routecap"])
    rc["requests"][0]["num_tokens"] += 100
    header["__metadata__"]["routecap"] = json.dumps(rc)
    raw = json.dumps(header).encode()
    p = tmp_path / "lie.safetensors"
    p.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    with pytest.raises(TraceFileError, match="request 0"):
        load_file(p)


def test_missing_path(tmp_path):
    with pytest.raises(TraceFileError, match="no such file"):
        load_file(tmp_path / "nope.safetensors")
    with pytest.raises(TraceFileError, match="no such file or folder"):
        open_traces(tmp_path / "nope")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(TraceFileError, match="no trace shards"):
        open_traces(tmp_path / "emptydir")


def test_writer_shards_by_count_and_bytes(tmp_path):
    ts = [trace(str(i), 10 + i, seed=i) for i in range(7)]
    with TraceWriter(tmp_path / "d", max_requests=3) as w:
        w.extend(ts)
    assert [s["num_requests"] for s in w.shards] == [3, 3, 1]
    index = json.loads((tmp_path / "d" / "traces.index.json").read_text())
    assert index["complete"] and index["num_requests"] == 7 and index["top_k"] == 4
    s = open_traces(tmp_path / "d")
    assert s.complete and len(s) == 7 and s.request_ids() == [t.request_id for t in ts]
    assert all(a.equals(b) for a, b in zip(ts, s))
    assert s.get("5").equals(ts[5])
    with pytest.raises(KeyError, match="request 'zz'"):
        s.get("zz")
    one = ts[0].nbytes
    with TraceWriter(tmp_path / "e", max_bytes=2 * one + 1) as w:
        w.extend(ts[:4])
    assert len(w.shards) >= 2
    assert not [p for p in (tmp_path / "d").iterdir() if p.name.endswith(".tmp")]


def test_writer_refuses_to_overwrite(tmp_path):
    with TraceWriter(tmp_path, max_requests=1) as w:
        w.append(trace("a", 2))
    with pytest.raises(FileExistsError, match="already holds traces with prefix 'traces'"):
        TraceWriter(tmp_path)
    assert len(open_traces(tmp_path)) == 1  # nothing lost
    with TraceWriter(tmp_path, overwrite=True) as w:
        w.append(trace("b", 2))
    assert open_traces(tmp_path).request_ids() == ["b"]


def test_writer_refuses_mixed_models_and_keeps_what_it_has(tmp_path):
    w = TraceWriter(tmp_path, max_requests=1)
    w.append(trace("a", 2))
    with pytest.raises(TraceValidationError, match="top_k"):
        w.append(trace("b", 2, K=2))
    w.close()
    assert open_traces(tmp_path).request_ids() == ["a"]


def test_writer_killed_midway_leaves_finished_shards(tmp_path):
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_files import trace
        from routecap.files import TraceWriter
        w = TraceWriter({str(tmp_path)!r}, max_requests=2)
        for i in range(5):
            w.append(trace(str(i), 6, seed=i))
        os._exit(3)   # killed: no close(), the 5th trace is only in memory
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode == 3, r.stderr
    s = open_traces(tmp_path)
    assert not s.complete
    assert s.request_ids() == ["0", "1", "2", "3"]
    assert all(t.equals(trace(t.request_id, 6, seed=int(t.request_id))) for t in s)


def test_shard_written_after_last_index_update_is_found(tmp_path):
    with TraceWriter(tmp_path, max_requests=1) as w:
        w.extend([trace("a", 2), trace("b", 3)])
    index = json.loads((tmp_path / "traces.index.json").read_text())
    index["shards"] = index["shards"][:1]  # as if killed between shard rename and index rename
    (tmp_path / "traces.index.json").write_text(json.dumps(index))
    (tmp_path / ".traces-00002.safetensors.abc.tmp").write_bytes(b"half a file")
    s = open_traces(tmp_path)
    assert s.request_ids() == ["a", "b"] and not s.complete


def test_several_prefixes_share_a_folder(tmp_path):
    with TraceWriter(tmp_path, prefix="rank000") as w0, TraceWriter(tmp_path, prefix="rank001") as w1:
        w0.append(trace("a", 2))
        w1.append(trace("b", 3))
    assert sorted(open_traces(tmp_path).request_ids()) == ["a", "b"]


def test_index_listing_a_missing_shard(tmp_path):
    with TraceWriter(tmp_path, max_requests=1) as w:
        w.extend([trace("a", 2), trace("b", 3)])
    (tmp_path / "traces-00000.safetensors").unlink()
    with pytest.raises(TraceFileError, match="lists shard traces-00000.safetensors, which is missing"):
        open_traces(tmp_path)


def test_fuzz_file_reader_only_clean_errors(tmp_path):
    """20,000 mutated trace files: valid traces or TraceFileError, nothing else."""
    from fuzzing import mutate

    good = tmp_path / "good.safetensors"
    save_file(traces_for(16), good)
    data = good.read_bytes()
    rng = np.random.default_rng(3)
    p = tmp_path / "f.safetensors"
    ok = 0
    for _ in range(20_000):
        p.write_bytes(mutate(rng, data))
        try:
            for t in load_file(p):
                validate_trace(t)
            ok += 1
        except TraceFileError:
            pass
    assert ok < 20_000
