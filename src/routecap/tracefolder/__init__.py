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

The package, one module per side: :mod:`.manifest` (names, the checksummed manifest and journals,
what a folder holds), :mod:`.reader` (:func:`open_traces`, :class:`TraceSet`), :mod:`.run` (the
transaction: :class:`FolderRun`) and :mod:`.writer` (:class:`TraceWriter`).
"""

from .manifest import MANIFEST_NAME, FolderState, inspect_folder, new_run_id
from .reader import TraceSet, open_traces
from .run import FolderRun
from .writer import TraceWriter

__all__ = ["MANIFEST_NAME", "FolderRun", "FolderState", "TraceSet", "TraceWriter", "inspect_folder",
           "new_run_id", "open_traces"]
