"""Trace folders: the manifest names exactly the shards a reader accepts; overwrite is a
transaction; a killed writer leaves a resumable folder; legacy (0.1) folders still read."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from test_files import trace

from routecap.files import TraceFileError, TraceWriter, open_traces, save_file
from routecap.trace import TraceValidationError
from routecap.tracefolder import MANIFEST_NAME, FolderRun, inspect_folder

HERE = os.path.dirname(__file__)


def write(folder, traces, **kw):
    with TraceWriter(folder, **kw) as w:
        w.extend(traces)
    return w


def snapshot(folder):
    """Every file's bytes (the lock file's description aside)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != ".routecap.lock"}


def rewrite_doc(path, change):
    doc = json.loads(path.read_text())
    change(doc)
    body = json.dumps({k: v for k, v in doc.items() if k != "checksum"}, sort_keys=True,
                      separators=(",", ":")).encode()
    doc["checksum"] = "sha256:" + hashlib.sha256(body).hexdigest()
    path.write_text(json.dumps(doc))


def fail_at_shard(monkeypatch, n, err_no=28):
    """Make the ``n``-th shard write from here on raise ``OSError(err_no)`` (28: a full disk,
    30: a read-only one); ``monkeypatch.undo()`` heals the disk. Returns the shard names tried."""
    from routecap.tracefolder import writer

    real = writer._atomic_write
    shards = []

    def failing(path, data):
        if path.name.endswith(".safetensors"):
            shards.append(path.name)
            if len(shards) == n:
                raise OSError(err_no, os.strerror(err_no), str(path))
        return real(path, data)

    monkeypatch.setattr(writer, "_atomic_write", failing)
    return shards


def test_writer_shards_by_count_and_bytes(tmp_path):
    ts = [trace(str(i), 10 + i, seed=i) for i in range(7)]
    w = write(tmp_path / "d", ts, max_requests=3)
    assert [len(s["request_ids"]) for s in w.shards] == [3, 3, 1]
    manifest = json.loads((tmp_path / "d" / MANIFEST_NAME).read_text())
    assert manifest["complete"] and manifest["num_requests"] == 7 and manifest["top_k"] == 4
    assert [s["file"] for s in manifest["shards"]] == [s["file"] for s in w.shards]
    assert not list((tmp_path / "d").glob("*.journal.json"))  # merged into the manifest
    s = open_traces(tmp_path / "d")
    assert s.complete and len(s) == 7 and s.request_ids() == [t.request_id for t in ts]
    got = list(s)
    assert len(got) == len(ts) and all(a.equals(b) for a, b in zip(ts, got, strict=True))
    assert s.get("5").equals(ts[5])
    with pytest.raises(KeyError, match="request 'zz'"):
        s.get("zz")
    one = ts[0].nbytes
    w = write(tmp_path / "e", ts[:4], max_bytes=2 * one + 1)
    assert len(w.shards) >= 2
    assert not [p for p in (tmp_path / "d").iterdir() if p.name.endswith(".tmp")]


def test_open_is_lazy_and_verifies_each_shard_on_first_touch(tmp_path):
    ts = [trace(str(i), 4, seed=i) for i in range(6)]
    w = write(tmp_path, ts, max_requests=2)
    bad = tmp_path / w.shards[2]["file"]
    data = bytearray(bad.read_bytes())
    data[-1] ^= 1
    bad.write_bytes(bytes(data))
    s = open_traces(tmp_path)  # reads the manifest only
    assert len(s) == 6 and s.num_tokens == 24
    assert s.get("0").equals(ts[0]) and s.get("3").equals(ts[3])  # shards 0 and 1 are fine
    with pytest.raises(TraceFileError, match="SHA-256 .* differs from the manifest"):
        s.get("4")
    with pytest.raises(TraceFileError, match="SHA-256"):
        list(s)
    assert len(list(open_traces(tmp_path, verify=False))) == 6  # the caller's choice


def test_a_shard_swapped_in_from_another_capture_is_refused(tmp_path):
    """Same model, same file name, other prompts: read back silently before the manifest."""
    a, b = tmp_path / "a", tmp_path / "b"
    wa = write(a, [trace("0", 5, seed=1), trace("1", 5, seed=2)], max_requests=1)
    write(b, [trace("0", 5, seed=7), trace("1", 5, seed=8)], max_requests=1)
    other = next(b.glob("*-00001.safetensors"))
    shutil.copy(other, a / wa.shards[1]["file"])
    with pytest.raises(TraceFileError, match="changed or replaced after it was written"):
        list(open_traces(a))


def test_a_shard_present_twice_under_another_name_is_refused(tmp_path):
    w = write(tmp_path, [trace("0", 5), trace("1", 5)], max_requests=1)
    shutil.copy(tmp_path / w.shards[0]["file"], tmp_path / "traces-copy-00000.safetensors")
    with pytest.raises(TraceFileError, match="traces-copy-00000.safetensors: a shard that the "
                       "manifest does not name"):
        open_traces(tmp_path)


def test_a_request_id_twice_is_refused(tmp_path):
    write(tmp_path, [trace("0", 5), trace("1", 5)], max_requests=1)

    def dup(doc):
        doc["shards"][1]["request_ids"] = ["0"]

    rewrite_doc(tmp_path / MANIFEST_NAME, dup)
    with pytest.raises(TraceFileError, match="request id '0' is in two shards"):
        open_traces(tmp_path)


def test_manifest_checksum_and_missing_shard(tmp_path):
    w = write(tmp_path, [trace("0", 5), trace("1", 5)], max_requests=1)
    mp = tmp_path / MANIFEST_NAME
    good = mp.read_bytes()
    mp.write_bytes(good.replace(b'"num_tokens": 10', b'"num_tokens": 11'))
    with pytest.raises(TraceFileError, match="checksum does not match"):
        open_traces(tmp_path)
    mp.write_bytes(good)
    (tmp_path / w.shards[0]["file"]).unlink()
    with pytest.raises(TraceFileError, match="names shard .*-00000.safetensors, which is missing"):
        open_traces(tmp_path)


def test_refuses_to_overwrite_unless_asked(tmp_path):
    write(tmp_path, [trace("a", 2)])
    with pytest.raises(FileExistsError, match="already holds a committed capture"):
        TraceWriter(tmp_path)
    assert open_traces(tmp_path).request_ids() == ["a"]  # nothing lost
    write(tmp_path, [trace("b", 2)], overwrite=True)
    assert open_traces(tmp_path).request_ids() == ["b"]


def test_overwrite_leaves_no_shard_of_the_old_capture(tmp_path):
    """An overwrite by a writer of another prefix used to keep the old rank* shards, and readers
    served them."""
    with TraceWriter(tmp_path, prefix="rank00001") as w:
        w.append(trace("old", 3))
    write(tmp_path, [trace("new", 2)], overwrite=True)
    assert open_traces(tmp_path).request_ids() == ["new"]
    m = inspect_folder(tmp_path).manifest
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == sorted(
        e["file"] for e in m["shards"])


def test_a_failed_overwrite_leaves_the_folder_exactly_as_it_was(tmp_path):
    write(tmp_path, [trace(str(i), 4, seed=i) for i in range(3)], max_requests=1)
    before = snapshot(tmp_path)
    with pytest.raises(RuntimeError, match="batch 2 failed"):
        with TraceWriter(tmp_path, overwrite=True, max_requests=1) as w:
            w.append(trace("x", 3))
            w.append(trace("y", 3))
            raise RuntimeError("batch 2 failed")
    assert snapshot(tmp_path) == before
    with pytest.raises(TraceValidationError, match="top_k"):
        with TraceWriter(tmp_path, overwrite=True, max_requests=1) as w:
            w.append(trace("x", 3))
            w.append(trace("z", 3, K=2))
    assert snapshot(tmp_path) == before
    assert [t.request_id for t in open_traces(tmp_path)] == ["0", "1", "2"]


def test_enospc_mid_overwrite_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    write(tmp_path, [trace(str(i), 4, seed=i) for i in range(3)], max_requests=1)
    before = snapshot(tmp_path)
    fail_at_shard(monkeypatch, 2)
    with pytest.raises(OSError, match="No space left"):
        write(tmp_path, [trace(str(i), 5, seed=9 + i) for i in range(3)], overwrite=True,
              max_requests=1)
    assert snapshot(tmp_path) == before


def test_a_failed_first_write_keeps_what_it_finished_for_a_resume(tmp_path):
    with pytest.raises(RuntimeError):
        with TraceWriter(tmp_path, max_requests=1) as w:
            w.extend([trace("0", 2), trace("1", 3)])
            raise RuntimeError("killed")
    s = open_traces(tmp_path)
    assert not s.complete and s.source == "journal" and s.request_ids() == ["0", "1"]
    with pytest.raises(FileExistsError, match="unfinished capture"):
        TraceWriter(tmp_path)
    with TraceWriter(tmp_path, resume=True, max_requests=1) as w:
        assert w.done_ids == {"0", "1"}
        w.append(trace("2", 4))
    s = open_traces(tmp_path)
    assert s.complete and s.request_ids() == ["0", "1", "2"]
    assert [t.num_tokens for t in s] == [2, 3, 4]


def test_convert_style_writer_rolls_back_a_fresh_folder(tmp_path):
    d = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with TraceWriter(d, keep_on_error=False, max_requests=1) as w:
            w.extend([trace("0", 2), trace("1", 3)])
            raise RuntimeError("bad record at line 3")
    assert not d.exists()


def test_writer_killed_midway_leaves_a_resumable_folder(tmp_path):
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {HERE!r})
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


def test_a_shard_finished_after_the_last_journal_update_is_redone(tmp_path):
    """Killed between a shard's rename and its journal update: the shard is not read, and a
    resume writes it again."""
    with pytest.raises(RuntimeError):
        with TraceWriter(tmp_path, max_requests=1) as w:
            w.extend([trace("a", 2), trace("b", 3)])
            raise RuntimeError
    run = w.run_id
    jp = next(tmp_path.glob("*.journal.json"))
    rewrite_doc(jp, lambda d: d.update(shards=d["shards"][:1]))
    (tmp_path / ".traces-00002.safetensors.abc.tmp").write_bytes(b"half a file")
    s = open_traces(tmp_path)
    assert s.request_ids() == ["a"] and not s.complete
    with TraceWriter(tmp_path, resume=True, max_requests=1) as w:
        assert w.run_id == run and w.done_ids == {"a"}
        w.append(trace("b", 3))
    assert open_traces(tmp_path).request_ids() == ["a", "b"]


def test_resume_checks_the_job(tmp_path):
    with pytest.raises(RuntimeError):
        with TraceWriter(tmp_path, job={"model": "m", "seed": 1}) as w:
            w.append(trace("a", 2))
            raise RuntimeError
    with pytest.raises(FileExistsError, match="differ in seed: 1 there, 2 now"):
        TraceWriter(tmp_path, resume=True, job={"model": "m", "seed": 2})
    run = FolderRun(tmp_path, resume=True, job={"model": "m", "seed": 1}).start()
    assert run.resumed and not run.already_complete
    run.close()


def test_several_prefixes_share_one_run(tmp_path):
    run = FolderRun(tmp_path).start()
    with TraceWriter(tmp_path, prefix="rank000", run=run.run_id) as w0, \
            TraceWriter(tmp_path, prefix="rank001", run=run.run_id) as w1:
        w0.append(trace("a", 2))
        w1.append(trace("b", 3))
    assert open_traces(tmp_path).source == "journal"  # not committed yet
    run.commit()
    run.close()
    s = open_traces(tmp_path)
    assert s.complete and sorted(s.request_ids()) == ["a", "b"]


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    w = TraceWriter(tmp_path)
    try:
        with pytest.raises(OSError, match=rf"being written by another routecap process \(pid "
                           rf"{os.getpid()} on host"):
            TraceWriter(tmp_path, overwrite=True)
        script = textwrap.dedent(f"""
            import sys
            from routecap.files import TraceWriter
            try:
                TraceWriter({str(tmp_path)!r}, overwrite=True)
            except OSError as e:
                print(e.strerror); sys.exit(2)
        """)
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert r.returncode == 2 and f"pid {os.getpid()}" in r.stdout, r.stdout + r.stderr
    finally:
        w.append(trace("a", 2))
        w.close()
    assert open_traces(tmp_path).request_ids() == ["a"]


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        from routecap.folderlock import FolderLock
        FolderLock({str(tmp_path)!r}, run_id="dead").acquire()
        print("locked", flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    assert '"run_id": "dead"' in (tmp_path / ".routecap.lock").read_text()
    with pytest.raises(OSError, match="run dead"):
        TraceWriter(tmp_path)
    p.kill()
    p.wait()
    write(tmp_path, [trace("a", 2)])  # the kernel released the dead holder's lock
    assert open_traces(tmp_path).request_ids() == ["a"]


def test_legacy_folders_still_read(tmp_path):
    """A folder as routecap 0.1 wrote it: {prefix}-NNNNN.safetensors and {prefix}.index.json."""
    ts = [trace("0", 3), trace("1", 4, seed=1)]
    save_file(ts[:1], tmp_path / "traces-00000.safetensors")
    save_file(ts[1:], tmp_path / "traces-00001.safetensors")
    index = {"format": "routecap.trace-index", "format_version": 1, "prefix": "traces",
             "complete": True, "shards": [{"file": "traces-00000.safetensors"},
                                          {"file": "traces-00001.safetensors"}]}
    (tmp_path / "traces.index.json").write_text(json.dumps(index))
    s = open_traces(tmp_path)
    assert s.source == "legacy-index" and s.complete
    assert all(a.equals(b) for a, b in zip(ts, s, strict=True))
    write(tmp_path, [trace("new", 2)], overwrite=True)  # an overwrite removes the 0.1 files
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == sorted(
        [MANIFEST_NAME] + [e["file"] for e in inspect_folder(tmp_path).manifest["shards"]])


def test_a_folder_without_manifest_is_not_read_by_file_names(tmp_path):
    save_file([trace("0", 3)], tmp_path / "traces-00000.safetensors")
    with pytest.raises(TraceFileError, match="no manifest.json and no trace shards"):
        open_traces(tmp_path)
    (tmp_path / "x").mkdir()
    with pytest.raises(TraceFileError, match="not a trace folder"):
        open_traces(tmp_path / "x")


@pytest.mark.parametrize("n", [pytest.param(300, id="fast"),
                               pytest.param(4_000, id="full", marks=pytest.mark.slow)])
def test_fuzz_folder_bytes_reject_or_read_back_exactly(tmp_path, n):
    """Mutate the manifest or a shard (header included): a TraceFileError, or exactly the
    original traces (a whitespace change in the manifest, say)."""
    from fuzzing import fuzz_rng, mutate, report_failure

    good = tmp_path / "good"
    original = [trace(str(i), 3 + i, seed=i, missing=i == 2) for i in range(5)]
    w = write(good, original, max_requests=2)
    names = [MANIFEST_NAME] + [s["file"] for s in w.shards]
    data = {name: (good / name).read_bytes() for name in names}
    seed, rng = fuzz_rng(11)
    d = tmp_path / "d"
    shutil.copytree(good, d)
    same = 0
    for i in range(n):
        name = names[int(rng.integers(len(names)))]
        m = mutate(rng, data[name])
        (d / name).write_bytes(m)
        with report_failure(seed, i, f"{name}: " + base64.b64encode(m).decode()):
            try:
                back = list(open_traces(d))
                assert len(back) == len(original)
                for a, b in zip(original, back, strict=True):
                    assert a.equals(b) and a.extra == b.extra, name
                same += 1
            except TraceFileError:
                pass
        (d / name).write_bytes(data[name])
    assert same < n


@pytest.mark.parametrize("first", ["routecap.tracefolder", "routecap.files"])
def test_either_module_imports_first(first):
    """files re-exports the folder API and the folder modules build on files: importing the folder
    package first in a fresh interpreter used to fail (a circular import)."""
    code = (f"import {first}; from routecap.files import TraceWriter, open_traces; "
            "from routecap.tracefolder import FolderRun, TraceSet; "
            "assert TraceWriter is __import__('routecap.tracefolder').tracefolder.TraceWriter")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.path.join(HERE, "..", "src")})
    assert r.returncode == 0, r.stderr
