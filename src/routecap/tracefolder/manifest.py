"""The on-disk model of a trace folder: file names, the checksummed JSON documents (manifest,
journals, 0.1 indexes), their validation, and :func:`inspect_folder`, what a folder holds.

Readers (:mod:`.reader`) and writers (:mod:`.run`, :mod:`.writer`) both start here; nothing in
this module writes except :func:`write_doc`.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..files import SHARD_SUFFIX, TraceFileError, _atomic_write

MANIFEST_NAME = "manifest.json"
SUMMARY_NAME = "summary.json"  # written by routecap capture after its commit
MANIFEST_FORMAT = "routecap.trace-manifest"
JOURNAL_FORMAT = "routecap.trace-journal"
LEGACY_INDEX_FORMAT = "routecap.trace-index"
FOLDER_FORMAT_VERSION = 1
JOURNAL_SUFFIX = ".journal.json"
LEGACY_INDEX_SUFFIX = ".index.json"
SHARED_FIELDS = ("model", "num_experts", "top_k", "moe_layers", "dtype", "topk_order")
PREFIX_RE = re.compile(r"^[A-Za-z0-9_]+$")
RUN_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")


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


def write_doc(path: Path, doc: dict[str, Any]) -> None:
    doc = {**doc, "checksum": "sha256:" + hashlib.sha256(_canonical(doc)).hexdigest()}
    _atomic_write(path, json.dumps(doc, indent=1))


def read_doc(path: Path, fmt: str) -> dict[str, Any]:
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


def shard_entries(doc: dict[str, Any], path: Path) -> list[dict[str, Any]]:
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
        st.manifest = read_doc(mp, MANIFEST_FORMAT)
        shard_entries(st.manifest, mp)
    for jp in sorted(folder.glob(f"*{JOURNAL_SUFFIX}")):
        j = read_doc(jp, JOURNAL_FORMAT)
        shard_entries(j, jp)
        run, prefix = j.get("run_id"), j.get("prefix")
        if not (isinstance(run, str) and RUN_RE.match(run) and isinstance(prefix, str)
                and PREFIX_RE.match(prefix) and jp.name == journal_name(prefix, run)):
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
