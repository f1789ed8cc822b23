"""Trace folders: shards named by a manifest that is committed last, one writer at a time.

The guarantees are those of a table format (Delta Lake / Iceberg: data files first, then one
atomic commit that names them) with git's habit of naming content by its hash:

* a run (one ``capture``, one ``convert``, one ``TraceWriter``) writes shards under names that
  carry its run id, ``{prefix}-{run}-{n:05d}.safetensors``, so it never touches another run's
  files; each writer keeps a journal ``{prefix}-{run}.journal.json`` (rewritten atomically after
  every shard) naming its finished shards with their SHA-256, request ids and token counts;
* the run ends by writing ``manifest.json`` atomically (temporary file, fsync, rename): the
  commit. It names every shard of the run with its hash and the files it supersedes; only then
  are the superseded files and the journals deleted. A run that fails or is killed before the
  commit leaves the previous manifest, and so the folder's data, exactly as it was;
* readers accept exactly the shards the manifest names: a shard it does not name, a hash that
  differs, a request id twice are errors, never silently read. Verification is lazy: a shard is
  hashed the first time it is read, so opening a large folder costs one small JSON read;
* one writer per folder: :class:`~routecap.folderlock.FolderLock` (``flock``) is held for the
  whole run; a second writer is refused at once, naming the holder;
* a killed run can be resumed: its journals say what is done (``routecap capture --resume``).

A folder without a manifest but with the journals of one run is an unfinished capture: it reads
(``complete`` is False) so that what was captured can be inspected. Folders written by routecap
0.1 (``{prefix}.index.json`` files, no hashes) still read, unverified by hash.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import secrets
import socket
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .files import (
    SHARD_SUFFIX,
    TMP_SUFFIX,
    TraceFileError,
    _atomic_write,
    _check_same,
    _encode,
    _shared_fields,
    fsync_folder,
    load_parsed,
    read_header,
)
from .folderlock import LOCK_NAME, FolderLock
from .trace import RoutingTrace, TraceValidationError

__all__ = ["MANIFEST_NAME", "FolderRun", "TraceSet", "TraceWriter", "new_run_id", "open_traces"]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "routecap.trace-manifest"
JOURNAL_FORMAT = "routecap.trace-journal"
LEGACY_INDEX_FORMAT = "routecap.trace-index"
FOLDER_FORMAT_VERSION = 1
JOURNAL_SUFFIX = ".journal.json"
LEGACY_INDEX_SUFFIX = ".index.json"
_SHARED = ("model", "num_experts", "top_k", "moe_layers", "dtype", "topk_order")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_]+$")
_RUN_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")


def new_run_id() -> str:
    return secrets.token_hex(6)


def shard_name(prefix: str, run_id: str, n: int) -> str:
    return f"{prefix}-{run_id}-{n:05d}{SHARD_SUFFIX}"


def journal_name(prefix: str, run_id: str) -> str:
    return f"{prefix}-{run_id}{JOURNAL_SUFFIX}"


# ---- checksummed JSON documents (manifest, journals) -------------------------------------------
def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in doc.items() if k != "checksum"}, sort_keys=True,
                      separators=(",", ":")).encode()


def _write_doc(path: Path, doc: dict[str, Any]) -> None:
    doc = {**doc, "checksum": "sha256:" + hashlib.sha256(_canonical(doc)).hexdigest()}
    _atomic_write(path, json.dumps(doc, indent=1))


def _read_doc(path: Path, fmt: str) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise TraceFileError(f"{path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TraceFileError(f"{path}: corrupt (not JSON: {e})") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise TraceFileError(f"{path}: expected a JSON object with format {fmt!r}, got {got!r}")
    if doc.get("format_version") != FOLDER_FORMAT_VERSION:
        raise TraceFileError(f"{path}: unsupported format_version {doc.get('format_version')!r} "
                             f"(this routecap reads {FOLDER_FORMAT_VERSION})")
    if doc.get("checksum") != "sha256:" + hashlib.sha256(_canonical(doc)).hexdigest():
        raise TraceFileError(f"{path}: corrupt: its checksum does not match its content")
    return doc


def _entry_ok(e: Any) -> bool:
    return (isinstance(e, dict) and isinstance(e.get("file"), str) and "/" not in e["file"]
            and e["file"].endswith(SHARD_SUFFIX) and isinstance(e.get("sha256"), str)
            and isinstance(e.get("request_ids"), list) and isinstance(e.get("num_tokens"), list)
            and len(e["request_ids"]) == len(e["num_tokens"])
            and all(isinstance(r, str) for r in e["request_ids"])
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                    for n in e["num_tokens"]))


def _shard_entries(doc: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    shards = doc.get("shards")
    if not isinstance(shards, list) or not all(_entry_ok(e) for e in shards):
        raise TraceFileError(f"{path}: corrupt shard list (each entry needs file, sha256, "
                             "request_ids and num_tokens)")
    return shards


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                h.update(m)
    return h.hexdigest()


# ---- what a folder holds -----------------------------------------------------------------------
@dataclass(kw_only=True)
class FolderState:
    folder: Path
    manifest: dict[str, Any] | None = None
    journals: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # run id -> journals
    journal_files: dict[str, list[str]] = field(default_factory=dict)
    legacy: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)

    @property
    def has_data(self) -> bool:
        return bool(self.manifest or self.journals or self.legacy)

    def allowed_names(self) -> set[str]:
        """Files a reader may meet besides the shards it reads: every run's journals and shards
        (and the one shard a killed writer may have finished after its last journal update),
        and what the manifest supersedes but a killed commit did not get to delete."""
        out: set[str] = set()
        for docs in self.journals.values():
            for j in docs:
                out.update(e["file"] for e in j["shards"])
                out.add(shard_name(j["prefix"], j["run_id"], len(j["shards"])))
        if self.manifest:
            out.update(self.manifest.get("superseded", []))
        return out


def inspect_folder(folder: Path) -> FolderState:
    st = FolderState(folder=folder)
    mp = folder / MANIFEST_NAME
    if mp.exists():
        st.manifest = _read_doc(mp, MANIFEST_FORMAT)
        _shard_entries(st.manifest, mp)
    for jp in sorted(folder.glob(f"*{JOURNAL_SUFFIX}")):
        j = _read_doc(jp, JOURNAL_FORMAT)
        _shard_entries(j, jp)
        run, prefix = j.get("run_id"), j.get("prefix")
        if not (isinstance(run, str) and _RUN_RE.match(run) and isinstance(prefix, str)
                and _PREFIX_RE.match(prefix) and jp.name == journal_name(prefix, run)):
            raise TraceFileError(f"{jp}: corrupt journal (run_id {run!r} and prefix {prefix!r} "
                                 "do not match its name)")
        st.journals.setdefault(run, []).append(j)
        st.journal_files.setdefault(run, []).append(jp.name)
    for ip in sorted(folder.glob(f"*{LEGACY_INDEX_SUFFIX}")):
        try:
            index = json.loads(ip.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TraceFileError(f"{ip}: corrupt index ({e})") from None
        if not isinstance(index, dict) or index.get("format") != LEGACY_INDEX_FORMAT:
            raise TraceFileError(f"{ip}: not a routecap trace index (expected format "
                                 f"{LEGACY_INDEX_FORMAT!r})")
        if index.get("format_version") != 1:
            raise TraceFileError(f"{ip}: unsupported index format version "
                                 f"{index.get('format_version')!r} (this routecap reads 1)")
        st.legacy.append((ip, index))
    return st


# ---- reading ------------------------------------------------------------------------------------
class TraceSet:
    """The traces of a folder or of one file, read lazily shard by shard.

    In a folder with a manifest, ``len``, ``request_ids()`` and ``num_tokens`` come from the
    manifest alone; a shard's bytes are hashed and compared with the manifest the first time
    that shard is read (``verify=False`` skips it). ``complete`` is False for a folder whose
    writer has not committed (an unfinished or killed capture).
    """

    def __init__(self, folder: Path | None, entries: list[dict[str, Any]], *, verify: bool,
                 complete: bool, source: str, manifest: dict[str, Any] | None = None) -> None:
        self.folder = folder
        self.entries = entries
        self.verify = verify
        self.complete = complete
        self.source = source  # "manifest", "journal", "legacy-index" or "file"
        self.manifest = manifest
        self.run_id: str | None = manifest.get("run_id") if manifest else None
        self.shards = [Path(e["path"]) for e in entries]
        self._verified: set[int] = set()
        self._where: dict[str, int] = {}
        for i, e in enumerate(entries):
            for rid in e["request_ids"]:
                if rid in self._where:
                    other = self.shards[self._where[rid]].name
                    raise TraceFileError(
                        f"{folder or self.shards[i]}: request id {rid!r} is in two shards "
                        f"({other} and {self.shards[i].name}); a request is recorded once")
                self._where[rid] = i
        self.shared: dict[str, Any] = {k: (manifest or {}).get(k) for k in _SHARED} if manifest \
            else {}

    def __len__(self) -> int:
        return sum(len(e["request_ids"]) for e in self.entries)

    @property
    def num_tokens(self) -> int:
        return sum(sum(e["num_tokens"]) for e in self.entries)

    def request_ids(self) -> list[str]:
        return [r for e in self.entries for r in e["request_ids"]]

    def _load(self, i: int) -> list[RoutingTrace]:
        e, p = self.entries[i], self.shards[i]
        hashed = e.get("sha256") is not None
        if self.verify and hashed and i not in self._verified:
            try:
                got = sha256_file(p)
            except FileNotFoundError:
                raise TraceFileError(f"{p}: named by the {self.source} but missing") from None
            if got != e["sha256"]:
                raise TraceFileError(
                    f"{p}: its SHA-256 {got[:16]}... differs from the {self.source}'s "
                    f"{e['sha256'][:16]}...: the shard was changed or replaced after it was "
                    "written (copied in from another capture?)")
        h = read_header(p)
        # bytes that match the manifest's hash are what the writer wrote (and validated): they
        # need neither the CRCs nor the contract checks; files without a hash get both
        traces = load_parsed(p, h, check_crc=self.verify and not hashed,
                             validate=self.verify and not hashed)
        ids = [t.request_id for t in traces]
        if ids != e["request_ids"] or [t.num_tokens for t in traces] != e["num_tokens"]:
            raise TraceFileError(f"{p}: holds requests {ids[:4]}... that differ from what the "
                                 f"{self.source} says ({e['request_ids'][:4]}...)")
        if traces:
            mine = _shared_fields(traces[0])
            if not self.shared:
                self.shared = mine
            elif mine != self.shared:
                diff = [k for k in _SHARED if mine[k] != self.shared[k]]
                raise TraceFileError(f"{p}: holds traces of another model than the rest of "
                                     f"{self.folder} (differs in {diff})")
        self._verified.add(i)
        return traces

    def __iter__(self) -> Iterator[RoutingTrace]:
        for i in range(len(self.entries)):
            yield from self._load(i)

    def get(self, request_id: str) -> RoutingTrace:
        """The trace of one request (reads only the shard that holds it)."""
        i = self._where.get(request_id)
        if i is None:
            raise KeyError(f"request {request_id!r} is not in these traces ({len(self)} requests)")
        return next(t for t in self._load(i) if t.request_id == request_id)

    def verify_all(self) -> dict[str, Any]:
        """Read every shard once (hash and structure); raise TraceFileError on the first bad one.
        Returns what was checked, for reports (``routecap show --json``)."""
        for i in range(len(self.entries)):
            if i not in self._verified:
                self._load(i)
        return self.status(checked=True)

    def status(self, *, checked: bool = False) -> dict[str, Any]:
        hashed = all(e.get("sha256") for e in self.entries)
        return {
            "complete": self.complete,
            "source": self.source,
            "run_id": self.run_id,
            "shards": len(self.entries),
            "verified": ("every shard matches its SHA-256" if hashed else
                         "CRC-32 of every tensor (no hashes in a legacy index)")
            if checked and self.verify else "not checked",
        }


def open_traces(path: str | os.PathLike, *, verify: bool = True) -> TraceSet:
    """Open a trace file or a trace folder (the shards its manifest names)."""
    path = Path(path)
    if not path.exists():
        raise TraceFileError(f"{path}: no such file or folder")
    if path.is_file():
        h = read_header(path)
        return TraceSet(None, [_entry_from_header(path, h)], verify=verify, complete=True,
                        source="file")
    st = inspect_folder(path)
    if st.manifest is not None:
        entries, source, complete = st.manifest["shards"], "manifest", True
        if not entries:
            raise TraceFileError(f"{path}: the manifest names no shard")
    elif st.journals:
        if len(st.journals) > 1:
            raise TraceFileError(f"{path}: holds the unfinished runs {sorted(st.journals)} and no "
                                 "manifest; finish one with --resume or rewrite with --overwrite")
        (docs,) = st.journals.values()
        entries = [e for j in sorted(docs, key=lambda j: j["prefix"]) for e in j["shards"]]
        source, complete = "journal", False
    elif st.legacy:
        entries, complete = [], True
        for ip, index in st.legacy:
            complete &= bool(index.get("complete"))
            for s in index.get("shards", []):
                f = path / str(s.get("file"))
                if not f.is_file():
                    raise TraceFileError(f"{ip}: lists shard {f.name}, which is missing")
                entries.append(_entry_from_header(f, read_header(f)))
        source = "legacy-index"
    else:
        raise TraceFileError(f"{path}: no {MANIFEST_NAME} and no trace shards: not a trace folder "
                             "(to read one trace file, give its path)")
    named = {e["file"] for e in entries}
    if len(named) != len(entries):
        raise TraceFileError(f"{path}: the {source} names a shard twice")
    allowed = named | st.allowed_names()
    for p in sorted(path.glob(f"*{SHARD_SUFFIX}")):
        if p.name not in allowed:
            raise TraceFileError(
                f"{p}: a shard that the {source} does not name (copied in, or left by another "
                "tool?); routecap reads exactly the shards it committed: move it out of the folder")
    out = [{**e, "path": str(path / e["file"])} for e in entries]
    if source != "legacy-index":
        for e in out:
            if not Path(e["path"]).is_file():
                raise TraceFileError(f"{path}: the {source} names shard {e['file']}, which is "
                                     "missing")
    return TraceSet(path, out, verify=verify, complete=complete, source=source,
                    manifest=st.manifest)


def _entry_from_header(path: Path, h: Any) -> dict[str, Any]:
    reqs = h.routecap.get("requests")
    try:
        ids = [r["request_id"] for r in reqs]
        counts = [int(r["num_tokens"]) for r in reqs]
    except (KeyError, TypeError, ValueError):
        raise TraceFileError(f"{path}: corrupt routecap header (request records)") from None
    return {"file": path.name, "path": str(path), "sha256": None, "request_ids": ids,
            "num_tokens": counts}


# ---- writing -------------------------------------------------------------------------------------
class FolderRun:
    """One run's hold on a folder: the lock, the decision (fresh, overwrite, resume), the commit.

    ``TraceWriter`` opens one for itself; a multi-process capture opens one in rank 0 and gives
    the other ranks its ``run_id`` (their writers take ``run=run_id``).
    """

    def __init__(self, folder: str | os.PathLike, *, overwrite: bool = False,
                 resume: bool = False, job: dict[str, Any] | None = None,
                 run_id: str | None = None, lock: bool = True) -> None:
        self.folder = Path(folder)
        self.overwrite = overwrite
        self.resume = resume
        self.job = job
        self.run_id = run_id or new_run_id()
        if not _RUN_RE.match(self.run_id):
            raise ValueError(f"run id must match {_RUN_RE.pattern}, got {self.run_id!r}")
        self.lock = FolderLock(self.folder, run_id=self.run_id) if lock else None
        self.created = not self.folder.exists()
        self.resumed = False  # continuing a killed run
        self.already_complete = False  # --resume on a committed folder: nothing to do
        self._previous: FolderState | None = None

    def start(self) -> FolderRun:
        if self.lock is not None:
            self.lock.acquire()
        try:
            self._decide(inspect_folder(self.folder))
        except BaseException:
            self.close()
            raise
        return self

    def _decide(self, st: FolderState) -> None:
        self._previous = st
        if self.resume:
            if len(st.journals) > 1:
                raise TraceFileError(f"{self.folder}: holds several unfinished runs "
                                     f"{sorted(st.journals)}; cannot tell which to resume")
            if st.journals:
                (run, docs), = st.journals.items()
                self._check_job(docs[0].get("job"), f"the unfinished run {run}")
                self.run_id, self.resumed = run, True
                if self.lock is not None:
                    self.lock.run_id = run
                return
            if st.manifest is not None:
                self._check_job(st.manifest.get("job"), "the committed capture")
                self.already_complete = True
                return
            if st.legacy:
                raise FileExistsError(f"{self.folder} holds traces written by routecap 0.1, which "
                                      "cannot be resumed")
            return  # nothing there yet: a fresh run
        if st.has_data and not self.overwrite:
            what = ("a committed capture" if st.manifest else "an unfinished capture (resume it "
                    "with --resume)" if st.journals else "traces of routecap 0.1")
            raise FileExistsError(f"{self.folder} already holds {what}; choose another folder, "
                                  "or overwrite")
        for run in list(st.journals):  # unfinished runs are discarded by an overwrite
            self._delete_run_files(st, run)
            del st.journals[run]

    def _check_job(self, theirs: Any, what: str) -> None:
        if self.job is None or theirs is None:
            return
        diff = sorted(k for k in set(self.job) | set(theirs) if self.job.get(k) != theirs.get(k))
        if diff:
            detail = ", ".join(f"{k}: {theirs.get(k)!r} there, {self.job.get(k)!r} now"
                               for k in diff[:4])
            raise FileExistsError(f"{self.folder}: --resume needs the same settings as {what}; "
                                  f"they differ in {detail}")

    def _delete_run_files(self, st: FolderState, run: str) -> None:
        names = set(st.journal_files.get(run, []))
        for j in st.journals.get(run, []):
            names.update(e["file"] for e in j["shards"])
            names.add(shard_name(j["prefix"], run, len(j["shards"])))
        _unlink_all(self.folder, names)

    def journals(self) -> list[dict[str, Any]]:
        return inspect_folder(self.folder).journals.get(self.run_id, [])

    def commit(self, *, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Merge this run's journals into ``manifest.json`` (the commit), then delete what it
        supersedes. Returns the manifest."""
        st = inspect_folder(self.folder)
        docs = sorted(st.journals.get(self.run_id, []), key=lambda j: j["prefix"])
        shards = [e for j in docs for e in j["shards"]]
        if not shards:
            raise TraceFileError(f"{self.folder}: no traces were written; nothing to commit")
        shared = None
        seen: set[str] = set()
        for j in docs:
            if not j["shards"]:
                continue
            if shared is None:
                shared = j["shared"]
            elif j["shared"] != shared:
                raise TraceFileError(f"{self.folder}: writers of run {self.run_id} wrote traces "
                                     f"of different models ({shared} and {j['shared']})")
        for e in shards:
            for rid in e["request_ids"]:
                if rid in seen:
                    raise TraceFileError(f"{self.folder}: request id {rid!r} was written twice "
                                         f"in run {self.run_id}")
                seen.add(rid)
        new = {e["file"] for e in shards}
        old: set[str] = set()
        if st.manifest is not None:
            old.update(e["file"] for e in st.manifest["shards"])
            old.update(st.manifest.get("superseded", []))
        for ip, index in st.legacy:
            old.add(ip.name)
            old.update(str(s.get("file")) for s in index.get("shards", []))
        manifest = {
            "format": MANIFEST_FORMAT, "format_version": FOLDER_FORMAT_VERSION,
            "run_id": self.run_id, "complete": True,
            "written_by": {"routecap": __version__, "host": socket.gethostname(),
                           "pid": os.getpid(),
                           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
            **(shared or {}),
            "num_requests": sum(len(e["request_ids"]) for e in shards),
            "num_tokens": sum(sum(e["num_tokens"]) for e in shards),
            "job": self.job,
            **(extra or {}),
            "shards": shards,
            "superseded": sorted(old - new),
        }
        _write_doc(self.folder / MANIFEST_NAME, manifest)  # the commit
        _unlink_all(self.folder, set(manifest["superseded"]) | set(
            st.journal_files.get(self.run_id, [])))
        return manifest

    def rollback(self) -> None:
        """Delete this run's files (a failed overwrite leaves the folder as it was)."""
        st = inspect_folder(self.folder)
        self._delete_run_files(st, self.run_id)
        if self.created and not any(p.name != LOCK_NAME for p in self.folder.iterdir()):
            # the folder did not exist before this run: remove it again
            (self.folder / LOCK_NAME).unlink(missing_ok=True)
            try:
                self.folder.rmdir()
            except OSError:
                pass

    @property
    def overwriting(self) -> bool:
        return bool(self._previous and (self._previous.manifest or self._previous.legacy))

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> FolderRun:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _unlink_all(folder: Path, names: Iterable[str]) -> None:
    for name in sorted(names):
        if "/" in name or name in (MANIFEST_NAME, LOCK_NAME):
            continue
        try:
            (folder / name).unlink()
        except FileNotFoundError:
            pass
    fsync_folder(folder)


class TraceWriter:
    """Append traces to a folder of shards: one shard per ``max_requests`` or ``max_bytes``.

    Every finished shard is on disk and in this writer's journal before ``append`` returns. On a
    clean exit the writer commits ``manifest.json``; until then readers see the folder's previous
    content. Leaving the ``with`` block on an exception keeps the finished shards for a resume,
    or, when the folder held a committed capture (an overwrite), deletes them: the old data stays
    exactly as it was.

    ``run=`` makes this one writer of a run that another process commits (data-parallel ranks:
    rank 0 opens the :class:`FolderRun`, every rank writes its own ``prefix``).

    Example:
        >>> import numpy as np, tempfile
        >>> d = tempfile.mkdtemp()
        >>> with TraceWriter(d, max_requests=2) as w:
        ...     for i in range(5):
        ...         w.append(RoutingTrace.from_ids(np.zeros((2, 1, 1), int), num_experts=4,
        ...                  moe_layers=[0], request_id=str(i), prompt_len=2))
        >>> len(open_traces(d)), len(w.shards)
        (5, 3)
    """

    def __init__(self, folder: str | os.PathLike, *, prefix: str = "traces",
                 max_requests: int = 1024, max_bytes: int = 256 << 20,
                 overwrite: bool = False, resume: bool = False, run: str | None = None,
                 job: dict[str, Any] | None = None, keep_on_error: bool = True) -> None:
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"TraceWriter: prefix must match {_PREFIX_RE.pattern}, got {prefix!r}")
        if max_requests < 1 or max_bytes < 1:
            raise ValueError(f"TraceWriter: expected max_requests >= 1 and max_bytes >= 1, got "
                             f"{max_requests}, {max_bytes}")
        self.folder = Path(folder)
        self.prefix = prefix
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.run: FolderRun | None = None
        if run is None:
            self.run = FolderRun(self.folder, overwrite=overwrite, resume=resume, job=job).start()
            run = self.run.run_id
        self.run_id = run
        self.job = job
        self.keep_on_error = keep_on_error
        self.shards: list[dict[str, Any]] = []
        self._shared: dict[str, Any] | None = None
        self._ids: set[str] = set()
        self._buffer: list[RoutingTrace] = []
        self._buffer_bytes = 0
        self.closed = False
        self.committed: dict[str, Any] | None = None
        try:
            self._open_journal()
        except BaseException:
            if self.run is not None:
                self.run.close()
            raise

    def _open_journal(self) -> None:
        jp = self.folder / journal_name(self.prefix, self.run_id)
        if jp.exists():  # a resumed run: continue after its last recorded shard
            j = _read_doc(jp, JOURNAL_FORMAT)
            for e in _shard_entries(j, jp):
                p = self.folder / e["file"]
                if not p.is_file() or sha256_file(p) != e["sha256"]:
                    raise TraceFileError(f"{p}: named by {jp.name} but missing or changed; "
                                         "cannot resume (start over with --overwrite)")
            self.shards = list(j["shards"])
            self._shared = j.get("shared")
            self._ids = {r for e in self.shards for r in e["request_ids"]}
            orphan = self.folder / shard_name(self.prefix, self.run_id, len(self.shards))
            orphan.unlink(missing_ok=True)  # finished after the last journal update: redo it
        self._write_journal()

    @property
    def done_ids(self) -> set[str]:
        """Request ids already in finished shards (those a resumed run can skip)."""
        return {r for e in self.shards for r in e["request_ids"]}

    def _write_journal(self) -> None:
        _write_doc(self.folder / journal_name(self.prefix, self.run_id), {
            "format": JOURNAL_FORMAT, "format_version": FOLDER_FORMAT_VERSION,
            "run_id": self.run_id, "prefix": self.prefix, "job": self.job,
            "shared": self._shared, "shards": self.shards,
        })

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()
        else:
            self.abort()

    def append(self, trace: RoutingTrace) -> None:
        if self.closed:
            raise ValueError("TraceWriter: append() after close()")
        if not isinstance(trace, RoutingTrace):
            raise TypeError(f"TraceWriter.append: expected a RoutingTrace, got {type(trace).__name__}")
        if self._shared is None:
            self._shared = _shared_fields(trace)
        else:
            _check_same(self._shared, trace, f"{self.folder}/{self.prefix}")
        if trace.request_id in self._ids:
            raise TraceValidationError("request_id", "unique request ids within a writer",
                                       f"{trace.request_id!r} twice")
        self._ids.add(trace.request_id)
        self._buffer.append(trace)
        self._buffer_bytes += trace.nbytes
        if len(self._buffer) >= self.max_requests or self._buffer_bytes >= self.max_bytes:
            self.flush()

    def extend(self, traces: Iterable[RoutingTrace]) -> None:
        for t in traces:
            self.append(t)

    def flush(self) -> None:
        """Write the buffered traces as one shard (if any) and record it in the journal."""
        if not self._buffer:
            return
        name = shard_name(self.prefix, self.run_id, len(self.shards))
        w = _atomic_write(self.folder / name, _encode(self._buffer))
        self.shards.append({
            "file": name,
            "sha256": w.sha256,
            "bytes": w.size,
            "request_ids": [t.request_id for t in self._buffer],
            "num_tokens": [t.num_tokens for t in self._buffer],
        })
        self._buffer = []
        self._buffer_bytes = 0
        self._write_journal()

    def close(self, *, commit: bool = True, extra: dict[str, Any] | None = None) -> None:
        """Write what is buffered; commit the run if this writer owns it (``run=`` not given)."""
        if self.closed:
            return
        self.closed = True
        try:
            self.flush()
            if self.run is not None and commit:
                self.committed = self.run.commit(extra=extra)
        except BaseException:
            if self.run is not None and self.run.overwriting:
                self.run.rollback()
            raise
        finally:
            if self.run is not None:
                self.run.close()

    def abort(self) -> None:
        """Stop after an error: keep finished shards for a resume, or, when overwriting a
        committed folder, delete this run's files (the folder stays as it was)."""
        if self.closed:
            return
        self.closed = True
        try:
            if self.run is not None and (self.run.overwriting or not self.keep_on_error):
                self.run.rollback()
            else:
                self.flush()
        finally:
            if self.run is not None:
                self.run.close()


def write_folder(traces: Sequence[RoutingTrace] | Iterable[RoutingTrace], folder: Path, *,
                 overwrite: bool = False, **kwargs: Any) -> int:
    """Write ``traces`` as one committed run; returns how many."""
    n = 0
    with TraceWriter(folder, overwrite=overwrite, **kwargs) as w:
        for t in traces:
            w.append(t)
            n += 1
    return n


def is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(TMP_SUFFIX)
