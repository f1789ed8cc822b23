"""The capture job behind ``routecap capture``: prompts in, trace shards and a summary out.

Runs in one process, or as one rank of a data-parallel group launched torchrun-style (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` in the environment). Under data parallelism each
rank takes every W-th prompt, writes its own shards (prefix ``rank00000``, ``rank00001``, ...) of
the same trace folder, and rank 0 writes the merged ``summary.json``. Dispatch modes:

* ``local``: plain data parallelism, each rank routes its own tokens (no collective in the model);
* ``gathered`` / ``gathered_padded``: vLLM's naive dispatch, the routers see every rank's tokens
  (:mod:`routecap.integrations.hf_dispatch`);
* ``ep``: transformers' own expert parallelism with all-to-all dispatch (the model is loaded with
  ``DistributedConfig(fsdp_size=W, ep_size=W, ep_implementation="all_to_all")``).

With a collective inside the forward (every mode but ``local``) all ranks must run the same number
of forwards: ranks with fewer prompts run one-token dummy batches, and ``generate`` runs with
``synced_gpus``.
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
from .files import TraceWriter, _atomic_write
from .prompts import Prompt

__all__ = ["DISPATCHES", "CaptureJob", "JobError", "JobResult", "run_capture_job"]

DISPATCHES = ("local", "gathered", "gathered_padded", "ep")


class JobError(ValueError):
    """The job cannot run as configured; the message says why and what to do."""


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
    dispatch: str = "local"


@dataclass(frozen=True, kw_only=True)
class JobResult:
    summary: TraceSummary | None  # rank 0 only under data parallelism
    shards: list[str]
    rank: int
    world: int


def _world() -> tuple[int, int, int]:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def _encode_batch(batch: Sequence[Prompt], tok: Any, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input_ids and attention_mask for a batch of prompts."""
    rows: list[list[int]] = []
    for p in batch:
        if p.token_ids is not None:
            bad = [t for t in p.token_ids if t >= vocab]
            if bad:
                raise JobError(f"request {p.request_id!r}: token id {bad[0]} is outside the "
                               f"model's vocabulary of {vocab}")
            rows.append(list(p.token_ids))
        else:
            ids = tok(p.text, add_special_tokens=True)["input_ids"]
            if not ids:
                raise JobError(f"request {p.request_id!r}: the prompt tokenizes to nothing")
            rows.append(list(ids))
    W = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), W), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), W), dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, W - len(r):] = torch.tensor(r)
        mask[b, W - len(r):] = 1
    return input_ids, mask


def load_model(name: str, *, device: str, dtype: torch.dtype, distributed_config: Any = None
               ) -> tuple[Any, Any]:
    """(model, tokenizer) for ``builtin:NAME`` or a local transformers model folder."""
    from .builtin import BUILTIN_PREFIX, byte_tokenizer, load_builtin

    if name.startswith(BUILTIN_PREFIX):
        try:
            model, tok = load_builtin(name, device="cpu" if distributed_config else device,
                                      dtype=dtype)
        except ValueError as e:
            raise JobError(f"--model: {e}") from None
        if distributed_config is None:
            return model, tok
        # transformers applies expert parallelism while loading: go through a folder
        with tempfile.TemporaryDirectory(prefix="routecap-builtin-") as tmp:
            model.save_pretrained(tmp)
            model, _ = _from_pretrained(Path(tmp), name, device, dtype, distributed_config,
                                        tokenizer=False)
            model.config.name_or_path = name
        return model, byte_tokenizer()
    return _from_pretrained(Path(name), name, device, dtype, distributed_config)


def _from_pretrained(path: Path, name: str, device: str, dtype: torch.dtype, dc: Any, *,
                     tokenizer: bool = True) -> tuple[Any, Any]:
    if not path.is_dir():
        raise JobError(f"--model {name}: no such folder, and not a built-in model (built-ins: "
                       "builtin:tiny-qwen3-moe). Models are loaded from local folders only.")
    if not (path / "config.json").is_file():
        raise JobError(f"--model {name}: no config.json in it; expected a transformers model "
                       "folder (as written by save_pretrained)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = None
    try:
        if tokenizer:
            tok = AutoTokenizer.from_pretrained(path)
        kwargs: dict[str, Any] = {"dtype": dtype}
        if dc is not None:
            kwargs["distributed_config"] = dc
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise JobError(f"--model {name}: cannot load a transformers causal LM from it ({e})") from None
    if dc is None:
        model.to(device)
    model.eval()
    if tok is not None:
        tok.padding_side = "left"
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
    return model, tok


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


def run_capture_job(job: CaptureJob, *, advance: Callable[[int], None] | None = None) -> JobResult:
    """Run ``job`` in this process (one rank of the group when ``WORLD_SIZE`` > 1)."""
    from .integrations.hf import HFRouteCapture, ParallelConfig, capture_generate

    if job.dispatch not in DISPATCHES:
        raise JobError(f"--dispatch {job.dispatch!r}: expected one of {DISPATCHES}")
    rank, world, local_rank = _world()
    device = job.device
    if world > 1 and device == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if world == 1 and job.dispatch != "local":
        raise JobError(f"--dispatch {job.dispatch} needs several processes (--nproc N, N > 1)")
    import torch.distributed as dist

    dc = _ep_config(world) if job.dispatch == "ep" else None
    if world > 1 and dc is None and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    model, tok = load_model(job.model, device=device, dtype=job.dtype, distributed_config=dc)
    parallel = None
    if world > 1 and job.dispatch != "local":
        layout = "local" if job.dispatch == "ep" else job.dispatch
        parallel = ParallelConfig(layout=layout, dp_group=None)
    cap = HFRouteCapture(model, strict=job.strict, parallel=parallel)
    prefix = "traces" if world == 1 else f"rank{rank:05d}"
    writer = TraceWriter(job.out_dir, prefix=prefix, max_requests=job.shard_requests,
                         overwrite=job.overwrite)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    mine = list(job.prompts)[rank::world]
    # with collectives in the forward, every rank runs as many batches as rank 0 (the most)
    n_batches = -(-len(mine) // job.batch_size)
    if parallel is not None or job.dispatch == "ep":
        n_batches = -(-len(list(job.prompts)[0::world]) // job.batch_size)
    torch.manual_seed(job.seed + rank)
    gen: dict[str, Any] = dict(max_new_tokens=job.max_new_tokens, do_sample=job.sample)
    if job.sample:
        gen.update(temperature=job.temperature, top_p=job.top_p)
    if tok.pad_token_id is not None:
        gen["pad_token_id"] = tok.pad_token_id
    if job.dispatch == "ep":
        gen["synced_gpus"] = True
    counter = LoadCounter()
    with cap, writer:
        for i in range(n_batches):
            batch = mine[i * job.batch_size:(i + 1) * job.batch_size]
            if batch:
                input_ids, mask = _encode_batch(batch, tok, vocab)
            else:  # keep the group in step: a one-token dummy batch whose routes are dropped
                input_ids, mask = torch.tensor([[tok.pad_token_id or 0]]), torch.tensor([[1]])
            traces, _ = capture_generate(
                model, input_ids.to(device), mask.to(device), capture=cap, dummy=not batch,
                request_ids=[p.request_id for p in batch] or None, **gen)
            for t in traces:
                if world > 1:
                    t = _with_rank(t, rank)
                writer.append(t)
                counter.add(t)
            if advance is not None and batch:
                advance(len(batch) * world)
    summary = counter.summary() if counter.num_requests else None
    shards = [s["file"] for s in writer.shards]
    if world > 1:
        parts = rcdist.all_gather_objects((counter, shards), None)
        merged = LoadCounter()
        for c, _ in parts:
            merged.merge(c)
        summary = merged.summary() if rank == 0 else None
        shards = [f for _, s in parts for f in s]
        rcdist.barrier(None)
    if rank == 0:
        if summary is None:
            raise JobError("no traces were captured")
        payload = {"routecap_version": __version__, "command": "capture", "model": job.model,
                   "device": job.device, "dtype": str(job.dtype).removeprefix("torch."),
                   "max_new_tokens": job.max_new_tokens, "sample": job.sample, "seed": job.seed,
                   "nproc": world, "dispatch": job.dispatch, "shards": shards,
                   **summary.to_dict()}
        _atomic_write(job.out_dir / "summary.json", json.dumps(payload, indent=1))
    if world > 1:
        dist.destroy_process_group()
    return JobResult(summary=summary, shards=shards, rank=rank, world=world)


def _with_rank(trace: Any, rank: int) -> Any:
    import dataclasses

    return dataclasses.replace(trace, extra={**trace.extra, "dp_rank": rank})
