import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from routecap.files import (
    TraceFileError,
    _header_crc,
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
    _rewrite_meta(good_file, p, format_version="3")
    with pytest.raises(TraceFileError, match="format version 3 is newer than this routecap reads"):
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
    with pytest.raises(TraceFileError, match="its checksum .header_crc32. does not match"):
        load_file(p)
    rc["header_crc32"] = _header_crc(rc)  # a consistent lie: caught by the structure checks
    header["__metadata__"]["routecap"] = json.dumps(rc)
    raw = json.dumps(header).encode()
    p.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    with pytest.raises(TraceFileError, match="request 0"):
        load_file(p)


def _as_version_1(src, dst):
    """The file as routecap 0.1 wrote it: format_version "1", no header checksum."""
    data = src.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    rc = json.loads(header["__metadata__"]["routecap"])
    del rc["header_crc32"]
    header["__metadata__"].update(format_version="1", routecap=json.dumps(rc, sort_keys=True))
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    dst.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


@pytest.mark.parametrize("old,new", [(r'\"request_id\":\"a\"', r'\"request_id\":\"A\"'),
                                     (r'\"start\":11,', r'\"start\":12,'),
                                     (r'\"prompt_len\":3,', r'\"prompt_len\":2,')])
def test_a_flipped_header_byte_is_caught(tmp_path, good_file, old, new):
    """Before file format 2 the header was not checksummed: one flipped byte silently changed a
    trace's request id, start or prompt length."""
    data = good_file.read_bytes()
    assert data.count(old.encode()) == 1 and len(old) == len(new)
    p = tmp_path / "flip.safetensors"
    p.write_bytes(data.replace(old.encode(), new.encode()))
    with pytest.raises(TraceFileError, match="header_crc32"):
        load_file(p)


def test_version_1_files_still_read(tmp_path, good_file):
    p = tmp_path / "v1.safetensors"
    _as_version_1(good_file, p)
    assert read_header(p).routecap.get("header_crc32") is None
    for a, b in zip(traces_for(16), load_file(p), strict=True):
        assert a.equals(b)


def test_files_get_the_umask_of_the_moment(tmp_path):
    """files.py used to read the umask once at import (by setting it: process-global, racy) and
    chmod every file to that; a umask set later was ignored."""
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        before = os.umask(0o022); os.umask(before)
        from test_files import trace
        from routecap.files import save_file
        os.umask(0o077)
        save_file([trace("a", 2)], {str(tmp_path / "t.safetensors")!r})
        print(oct(os.stat({str(tmp_path / "t.safetensors")!r}).st_mode & 0o777))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "0o600"
    assert "os.umask(" not in (Path(__file__).parents[1] / "src/routecap/files.py").read_text()


def test_missing_path(tmp_path):
    with pytest.raises(TraceFileError, match="no such file"):
        load_file(tmp_path / "nope.safetensors")
    with pytest.raises(TraceFileError, match="no such file or folder"):
        open_traces(tmp_path / "nope")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(TraceFileError, match="no trace shards"):
        open_traces(tmp_path / "emptydir")




@pytest.mark.parametrize("n", [pytest.param(2_000, id="fast"),
                               pytest.param(20_000, id="full", marks=pytest.mark.slow)])
def test_fuzz_file_reader_rejects_or_reads_back_exactly(tmp_path, n):
    """Mutated trace files (header included): a TraceFileError, or exactly the original traces."""
    from fuzzing import fuzz_rng, mutate, report_failure

    good = tmp_path / "good.safetensors"
    original = traces_for(16)
    save_file(original, good)
    data = good.read_bytes()
    seed, rng = fuzz_rng(3)
    p = tmp_path / "f.safetensors"
    same = 0
    for i in range(n):
        m = mutate(rng, data)
        p.write_bytes(m)
        with report_failure(seed, i, m):
            try:
                back = load_file(p)
            except TraceFileError:
                continue
            assert len(back) == len(original)
            for a, b in zip(original, back, strict=True):
                assert a.equals(b) and a.extra == b.extra and a.model == b.model
        same += 1
    assert same < n


def test_golden_files_of_both_versions_read_and_format_2_is_written_byte_exact(tmp_path):
    """tests/golden/traces-v1.safetensors (format 1, no header checksum) still reads; format 2's
    golden file reads the same traces, and today's writer gives exactly its bytes."""
    from test_golden import GOLDEN, golden_trace

    expected = [golden_trace(128, 8, seed=0), golden_trace(128, 8, seed=1, tokens=False)]
    for name in ("traces-v1.safetensors", "traces-v2.safetensors"):
        got = load_file(GOLDEN / name)
        assert len(got) == 2 and all(g.equals(e) for g, e in zip(got, expected, strict=True))
    assert read_header(GOLDEN / "traces-v1.safetensors").routecap.get("header_crc32") is None
    save_file(expected, tmp_path / "t.safetensors")
    assert (tmp_path / "t.safetensors").read_bytes() == (GOLDEN / "traces-v2.safetensors").read_bytes()
