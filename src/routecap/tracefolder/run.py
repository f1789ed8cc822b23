"""One run's hold on a trace folder, as a transaction: the lock, the decision (fresh,
overwrite, resume), the commit that writes ``manifest.json`` last, and the rollback that leaves
an overwritten folder exactly as it was."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .. import __version__
from ..files import TraceFileError, fsync_folder
from ..folderlock import LOCK_NAME, FolderLock
from .manifest import (
    FOLDER_FORMAT_VERSION,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    RUN_RE,
    SUMMARY_NAME,
    FolderState,
    inspect_folder,
    new_run_id,
    shard_name,
    write_doc,
)

__all__ = ["FolderRun"]


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
        if not RUN_RE.match(self.run_id):
            raise ValueError(f"run id must match {RUN_RE.pattern}, got {self.run_id!r}")
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
        if "summary" not in (extra or {}) and (self.folder / SUMMARY_NAME).exists():
            old.add(SUMMARY_NAME)  # it would describe traces that are gone
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
        write_doc(self.folder / MANIFEST_NAME, manifest)  # the commit
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
