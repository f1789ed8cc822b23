"""Writing a trace folder: :class:`TraceWriter` appends traces as shards, each one on disk and in
the writer's journal before ``append`` returns, and commits through its :class:`~.run.FolderRun`."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..files import TraceFileError, _atomic_write, _check_same, _encode, _shared_fields
from ..trace import RoutingTrace, TraceValidationError
from .manifest import (
    FOLDER_FORMAT_VERSION,
    JOURNAL_FORMAT,
    PREFIX_RE,
    journal_name,
    read_doc,
    sha256_file,
    shard_entries,
    shard_name,
    write_doc,
)
from .run import FolderRun

__all__ = ["TraceWriter"]


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
        >>> from routecap.tracefolder import open_traces
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
        if not PREFIX_RE.match(prefix):
            raise ValueError(f"TraceWriter: prefix must match {PREFIX_RE.pattern}, got {prefix!r}")
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
            j = read_doc(jp, JOURNAL_FORMAT)
            for e in shard_entries(j, jp):
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
        write_doc(self.folder / journal_name(self.prefix, self.run_id), {
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
