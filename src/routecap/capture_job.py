"""The capture job behind ``routecap capture``: prompts in, a committed trace folder out.

Runs in one process, or as one rank of a data-parallel group started by torch's launcher
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` in the environment). Under data
parallelism each rank takes every W-th prompt and writes its own shards (prefix ``rank00000``,
``rank00001``, ...) of one run; rank 0 holds the folder's lock and commits the manifest and
``summary.json`` when every rank has finished. Dispatch modes:

* ``local``: plain data parallelism, each rank routes its own tokens (no collective in the model);
* ``gathered`` / ``gathered_padded``: vLLM's naive dispatch, the routers see every rank's tokens
  (:mod:`routecap.integrations.hf_dispatch`);
* ``ep``: transformers' own expert parallelism with all-to-all dispatch (the model is loaded with
  ``DistributedConfig(fsdp_size=W, ep_size=W, ep_implementation="all_to_all")``).

With a collective inside the forward (every mode but ``local``) all ranks must run the same number
of forwards: ranks with fewer prompts run one-token dummy batches, and ``generate`` runs with
``synced_gpus``.

Order of work: everything checkable is checked before the model loads (sampling arguments, the
model folder's files, the tokenizer, every prompt's token ids against the vocabulary, the output
folder: writable, not held by another writer, not holding a capture unless ``overwrite`` or
``resume``). Each batch is seeded from (seed, rank, batch number), so a resumed capture reruns
exactly the batches that were not finished and gets the same routes an uninterrupted one would.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from . import distributed as rcdist
from .analysis import LoadCounter, TraceSummary
from .capture_checks import (
    JobError,
    check_model,
    check_sampling,
    encode_prompts,
    fingerprint,
)
from .files import TraceFileError, _atomic_write
from .folderlock import FolderLockedError, describe_os_error
from .prompts import Prompt
from .tracefolder import FolderRun, TraceSet, TraceWriter

__all__ = ["DISPATCHES", "CaptureJob", "JobError", "JobResult", "run_capture_job"]

DISPATCHES = ("local", "gathered", "gathered_padded", "ep")


@dataclass(frozen=True, kw_only=True)
class CaptureJob:
    model: str
    prompts: Sequence[Prompt]
    out_dir: Path
    max_new_tokens: int = 16
    batch_size: int = 8
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    seed: int = 0
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    strict: bool = True
    shard_requests: int = 1024
    overwrite: bool = False
    resume: bool = False
    dispatch: str = "local"


@dataclass(frozen=True, kw_only=True)
class JobResult:
    summary: TraceSummary | None  # rank 0 only under data parallelism
    shards: list[str]
    rank: int
    world: int
    run_id: str = ""
    resumed_requests: int = 0  # requests a resumed run found already written
    already_complete: bool = False  # --resume on a committed capture: nothing was run


class QuietJobError(JobError):
    """A failure another rank (rank 0) reports; this rank exits without repeating it."""


def _world() -> tuple[int, int, int]:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def _pad_left(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input_ids and attention_mask for a batch of token id lists."""
    W = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), W), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), W), dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, W - len(r):] = torch.tensor(r)
        mask[b, W - len(r):] = 1
    return input_ids, mask


def _batch_seed(seed: int, rank: int, batch: int) -> int:
    return ((seed * 1_000_003 + rank) * 1_000_003 + batch) % (1 << 63)


def load_tokenizer(name: str, *, builtin: bool) -> Any:
    """The model's tokenizer (left padding; pad = eos when it has no pad token)."""
    if builtin:
        from .builtin import byte_tokenizer

        return byte_tokenizer()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(Path(name))
    except Exception as e:  # noqa: BLE001 -- any failure of user files is a one-line error
        raise JobError(f"--model {name}: cannot load its tokenizer ({type(e).__name__}: {e})"
                       ) from None
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, *, device: str, dtype: torch.dtype, distributed_config: Any = None
               ) -> Any:
    """The model for ``builtin:NAME`` or a local transformers model folder."""
    from .builtin import BUILTIN_PREFIX, load_builtin

    if name.startswith(BUILTIN_PREFIX):
        try:
            model, _ = load_builtin(name, device="cpu" if distributed_config else device,
                                    dtype=dtype)
        except ValueError as e:
            raise JobError(f"--model: {e}") from None
        if distributed_config is None:
            return model
        # transformers applies expert parallelism while loading: go through a folder
        with tempfile.TemporaryDirectory(prefix="routecap-builtin-") as tmp:
            model.save_pretrained(tmp)
            model = _from_pretrained(Path(tmp), name, device, dtype, distributed_config)
            model.config.name_or_path = name
        return model
    return _from_pretrained(Path(name), name, device, dtype, distributed_config)


def _from_pretrained(path: Path, name: str, device: str, dtype: torch.dtype, dc: Any) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        kwargs: dict[str, Any] = {"dtype": dtype}
        if dc is not None:
            kwargs["distributed_config"] = dc
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:  # noqa: BLE001 -- corrupt or unsupported user files: one line, exit 2
        raise JobError(f"--model {name}: cannot load a transformers causal LM from it "
                       f"({type(e).__name__}: {e})") from None
    if dc is None:
        model.to(device)
    model.eval()
    return model


def _ep_config(world: int) -> Any:
    try:
        from transformers.distributed import DistributedConfig

        return DistributedConfig(fsdp_size=world, ep_size=world, ep_implementation="all_to_all")
    except (ImportError, TypeError) as e:
        import transformers

        raise JobError(
            f"--dispatch ep needs transformers' all-to-all expert parallelism "
            f"(DistributedConfig(ep_size=..., ep_implementation='all_to_all')), which transformers "
            f"{transformers.__version__} does not have ({e}); upgrade transformers or use "
            "--dispatch gathered") from None


def _settings(job: CaptureJob, world: int) -> dict[str, Any]:
    return {"max_new_tokens": job.max_new_tokens, "batch_size": job.batch_size,
            "device": job.device.split(":")[0], "dtype": str(job.dtype).removeprefix("torch."),
            "seed": job.seed, "sample": job.sample,
            "temperature": job.temperature if job.sample else None,
            "top_p": job.top_p if job.sample else None, "strict": job.strict, "nproc": world,
            "dispatch": job.dispatch}


def _open_folder(job: CaptureJob, fp: dict[str, Any]) -> tuple[FolderRun | None, Any]:
    """Rank 0 takes the folder: (run, decision) where decision is what every rank needs."""
    try:
        run = FolderRun(job.out_dir, overwrite=job.overwrite, resume=job.resume, job=fp).start()
    except FolderLockedError as e:
        return None, ("error", str(e.strerror))
    except FileExistsError as e:
        hint = "" if job.resume else "; pass --overwrite (or --resume to finish an unfinished one)"
        return None, ("error", f"{e}{hint}")
    except TraceFileError as e:
        return None, ("error", str(e))
    except OSError as e:
        return None, ("error", describe_os_error(e, f"--out {job.out_dir}"))
    return run, ("ok", run.run_id, run.already_complete)


def run_capture_job(job: CaptureJob, *, advance: Callable[[int], None] | None = None) -> JobResult:
    """Run ``job`` in this process (one rank of the group when ``WORLD_SIZE`` > 1)."""
    if job.dispatch not in DISPATCHES:
        raise JobError(f"--dispatch {job.dispatch!r}: expected one of {DISPATCHES}")
    rank, world, local_rank = _world()
    if world == 1 and job.dispatch != "local":
        raise JobError(f"--dispatch {job.dispatch} needs several processes (--nproc N, N > 1)")
    device = job.device
    if world > 1 and device == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    import torch.distributed as dist

    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    ok = False
    try:
        result = _run(job, rank, world, device, advance)[0]
        ok = True
        return result
    except OSError as e:
        raise JobError(describe_os_error(e, f"writing the traces to {job.out_dir}")) from None
    finally:
        if world > 1 and dist.is_initialized():
            if ok:  # NOTE: ranks leave together, so no rank tears the group down under another
                rcdist.barrier(None)
            dist.destroy_process_group()


def _run(job: CaptureJob, rank: int, world: int, device: str,
         advance: Callable[[int], None] | None) -> tuple[JobResult, FolderRun | None]:
    from .integrations.hf import HFRouteCapture, ParallelConfig, capture_generate

    # ---- checks before the model loads (every rank checks its inputs; rank 0 takes the folder)
    prompts = list(job.prompts)
    decision: Any = None
    run: FolderRun | None = None
    try:
        check_sampling(sample=job.sample, temperature=job.temperature, top_p=job.top_p)
        dc = _ep_config(world) if job.dispatch == "ep" else None
        info = check_model(job.model)
        needs_tok = any(p.token_ids is None for p in prompts)
        # a tokenizer only where there is one and a text prompt needs it (token-id prompts do not)
        tok = load_tokenizer(job.model, builtin=info.builtin) \
            if info.builtin or (needs_tok and info.has_tokenizer) else None
        rows = encode_prompts(prompts, tok, info.vocab_size)
        fp = fingerprint(model=info, prompts=prompts, settings=_settings(job, world))
        if rank == 0:
            run, decision = _open_folder(job, fp)
    except JobError as e:
        decision = ("error", str(e))
    if world > 1:
        decisions = rcdist.all_gather_objects(decision, None)
        decision = next((d for d in decisions if d and d[0] == "error"), decisions[0])
    if decision[0] == "error":
        if run is not None:
            run.close()
        if rank == 0 or world == 1:
            raise JobError(decision[1])
        raise QuietJobError(decision[1])
    _, run_id, already_complete = decision
    if already_complete:
        if run is not None:
            run.close()
        return JobResult(summary=None, shards=[], rank=rank, world=world, run_id=run_id,
                         already_complete=True), run

    try:
        return _capture(job, rank, world, device, advance, run, run_id, rows, tok, dc, fp,
                        HFRouteCapture, ParallelConfig, capture_generate), run
    except BaseException:
        if run is not None and run.overwriting:
            run.rollback()  # the folder keeps its committed capture, exactly as it was
        raise
    finally:
        if run is not None:
            run.close()


def _capture(job: CaptureJob, rank: int, world: int, device: str,
             advance: Callable[[int], None] | None, run: FolderRun | None, run_id: str,
             rows: list[list[int]], tok: Any, dc: Any, fp: dict[str, Any],
             HFRouteCapture: Any, ParallelConfig: Any, capture_generate: Any) -> JobResult:
    prompts = list(job.prompts)
    model = load_model(job.model, device=device, dtype=job.dtype, distributed_config=dc)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    encode_prompts([p for p in prompts if p.token_ids is not None], None, vocab)
    parallel = None
    if world > 1 and job.dispatch != "local":
        layout = "local" if job.dispatch == "ep" else job.dispatch
        parallel = ParallelConfig(layout=layout, dp_group=None)
    cap = HFRouteCapture(model, strict=job.strict, parallel=parallel)
    prefix = "traces" if world == 1 else f"rank{rank:05d}"
    writer = TraceWriter(job.out_dir, prefix=prefix, max_requests=job.shard_requests,
                         run=run_id, job=fp)
    counter = LoadCounter()
    done = writer.done_ids
    if writer.shards:  # a resumed run: what is written counts in the summary
        entries = [{**e, "path": str(job.out_dir / e["file"])} for e in writer.shards]
        for t in TraceSet(job.out_dir, entries, verify=True, complete=False, source="journal"):
            counter.add(t)
    order = list(range(len(prompts)))[rank::world]
    mine = [prompts[i] for i in order]
    my_rows = [rows[i] for i in order]
    B = job.batch_size
    n_batches = -(-len(mine) // B)
    if parallel is not None or job.dispatch == "ep":
        n_batches = -(-len(prompts[0::world]) // B)  # every rank runs as many batches as rank 0
    finished = [all(p.request_id in done for p in mine[i * B:(i + 1) * B])
                for i in range(n_batches)]
    n_done = len(done)
    if world > 1:  # skip a batch only where every rank has finished it (the group stays in step)
        parts = rcdist.all_gather_objects((finished, n_done), None)
        finished = [all(f[i] if i < len(f) else True for f, _ in parts) for i in range(n_batches)]
        n_done = sum(n for _, n in parts)
    if advance is not None and n_done:
        advance(n_done)
    gen: dict[str, Any] = dict(max_new_tokens=job.max_new_tokens, do_sample=job.sample)
    if job.sample:
        gen.update(temperature=job.temperature, top_p=job.top_p)
    pad = _pad_id(model, tok)
    gen["pad_token_id"] = pad
    if job.dispatch == "ep":
        gen["synced_gpus"] = True
    with cap:
        for i in range(n_batches):
            if finished[i]:
                continue
            batch = mine[i * B:(i + 1) * B]
            if batch:
                input_ids, mask = _pad_left(my_rows[i * B:(i + 1) * B], pad)
            else:  # keep the group in step: a one-token dummy batch whose routes are dropped
                input_ids, mask = torch.tensor([[pad]]), torch.tensor([[1]])
            torch.manual_seed(_batch_seed(job.seed, rank, i))
            try:
                traces, _ = capture_generate(
                    model, input_ids.to(device), mask.to(device), capture=cap, dummy=not batch,
                    request_ids=[p.request_id for p in batch] or None, **gen)
            except BaseException:
                writer.abort()
                raise
            for t in traces:
                if t.request_id in done:
                    continue  # finished before the resume; the rerun of its batch is identical
                if world > 1:
                    t = _with_rank(t, rank)
                writer.append(t)
                counter.add(t)
            if advance is not None and batch:
                advance(sum(p.request_id not in done for p in batch) * world)
    writer.close(commit=False)
    summary = counter.summary() if counter.num_requests else None
    shards = [s["file"] for s in writer.shards]
    if world > 1:
        parts = rcdist.all_gather_objects((counter, shards), None)
        merged = LoadCounter()
        for c, _ in parts:
            merged.merge(c)
        summary = merged.summary() if rank == 0 and merged.num_requests else None
        shards = [f for _, s in parts for f in s]
    if rank == 0:
        if summary is None:
            raise JobError("no traces were captured")
        payload = {"routecap_version": __version__, "command": "capture", "run_id": run_id,
                   "model": job.model, "device": job.device,
                   "dtype": str(job.dtype).removeprefix("torch."),
                   "max_new_tokens": job.max_new_tokens, "sample": job.sample, "seed": job.seed,
                   "nproc": world, "dispatch": job.dispatch, "shards": shards,
                   **summary.to_dict()}
        assert run is not None
        run.commit(extra={"summary": payload})
        # a convenience copy; the manifest's "summary" is the committed one
        _atomic_write(job.out_dir / "summary.json", json.dumps(payload, indent=1))
    return JobResult(summary=summary, shards=shards, rank=rank, world=world, run_id=run_id,
                     resumed_requests=n_done)


def _pad_id(model: Any, tok: Any) -> int:
    if tok is not None and tok.pad_token_id is not None:
        return int(tok.pad_token_id)
    gc = getattr(model, "generation_config", None)
    for v in (getattr(gc, "pad_token_id", None), getattr(gc, "eos_token_id", None),
              getattr(model.config, "pad_token_id", None),
              getattr(model.config, "eos_token_id", None)):
        if isinstance(v, list) and v:
            v = v[0]
        if isinstance(v, int):
            return v
    return 0


def _with_rank(trace: Any, rank: int) -> Any:
    import dataclasses

    return dataclasses.replace(trace, extra={**trace.extra, "dp_rank": rank})
