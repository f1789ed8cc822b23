"""Reading a trace folder or file: :func:`open_traces` accepts exactly the shards the manifest
names and :class:`TraceSet` reads them lazily, hashing each shard the first time it is read."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..files import SHARD_SUFFIX, TraceFileError, _shared_fields, load_parsed, read_header
from ..trace import RoutingTrace
from .manifest import MANIFEST_NAME, SHARED_FIELDS, inspect_folder, sha256_file

__all__ = ["TraceSet", "open_traces"]


class TraceSet:
    """The traces of a folder or of one file, read lazily shard by shard.

    In a folder with a manifest, ``len``, ``request_ids()`` and ``num_tokens`` come from the
    manifest alone; a shard's bytes are hashed and compared with the manifest the first time
    that shard is read (``verify=False`` skips it). ``complete`` is False for a folder whose
    writer has not committed (an unfinished or killed capture).
    """

    def __init__(self, folder: Path | None, entries: list[dict[str, Any]], *, verify: bool,
                 complete: bool, source: str, manifest: dict[str, Any] | None = None,
                 shared: dict[str, Any] | None = None) -> None:
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
        self.shared: dict[str, Any] = {k: manifest.get(k) for k in SHARED_FIELDS} if manifest \
            else dict(shared or {})

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
                diff = [k for k in SHARED_FIELDS if mine[k] != self.shared[k]]
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
                        source="file", shared={k: h.routecap.get(k) for k in SHARED_FIELDS})
    st = inspect_folder(path)
    shared: dict[str, Any] | None = None
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
        entries, complete, shared = [], True, None
        for ip, index in st.legacy:
            complete &= bool(index.get("complete"))
            for s in index.get("shards", []):
                f = path / str(s.get("file"))
                if not f.is_file():
                    raise TraceFileError(f"{ip}: lists shard {f.name}, which is missing")
                h = read_header(f)
                shared = shared or {k: h.routecap.get(k) for k in SHARED_FIELDS}
                entries.append(_entry_from_header(f, h))
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
    if source == "journal":
        shared = next((j["shared"] for j in docs if j.get("shared")), None)
    return TraceSet(path, out, verify=verify, complete=complete, source=source,
                    manifest=st.manifest, shared=shared if source != "manifest" else None)


def _entry_from_header(path: Path, h: Any) -> dict[str, Any]:
    reqs = h.routecap.get("requests")
    try:
        ids = [r["request_id"] for r in reqs]
        counts = [int(r["num_tokens"]) for r in reqs]
    except (KeyError, TypeError, ValueError):
        raise TraceFileError(f"{path}: corrupt routecap header (request records)") from None
    return {"file": path.name, "path": str(path), "sha256": None, "request_ids": ids,
            "num_tokens": counts}
