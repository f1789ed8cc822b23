"""The ``routecap`` command line."""

from __future__ import annotations

import json
import os
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from . import __version__
from .cli_output import err, fail, out, print_request, print_summary, token_decoder

app = typer.Typer(
    name="routecap",
    help="Capture, store, replay and analyse the routing decisions of Mixture-of-Experts models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# how long a rank whose failure rank 0 reports waits for rank 0 to report it (it is stopped then)
QUIET_RANK_GRACE_S = 10.0


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Dispatch(str, Enum):
    local = "local"
    gathered = "gathered"
    gathered_padded = "gathered_padded"
    ep = "ep"


class Format(str, Enum):
    trace = "trace"
    wire = "wire"
    sglang = "sglang"
    vllm = "vllm"


WireMode = Enum("WireMode", {m: m for m in ("auto", "order", "set", "entropy", "ids", "raw")},
                type=str)


class PromptFormat(str, Enum):
    auto = "auto"
    text = "text"
    ids = "ids"
    jsonl = "jsonl"


def _version(value: bool) -> None:
    if value:
        out.print(f"routecap {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    pass


def _resolve_device(device: Device) -> str:
    import torch

    if device is Device.auto:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device is Device.cuda and not torch.cuda.is_available():
        raise fail("--device cuda: no CUDA device is available (torch.cuda.is_available() is "
                   "False); use --device cpu")
    return device.value


def _resolve_dtype(dtype: DType, device: str) -> Any:
    import torch

    if dtype is DType.auto:
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, dtype.value)


@app.command()
def capture(
    model: Annotated[str, typer.Option(help="builtin:tiny-qwen3-moe or a local transformers "
                                            "model folder.")],
    prompts: Annotated[Path, typer.Option(help="Prompts: text lines, JSONL, or token ids.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the trace shards, index and "
                                                        "summary.json.")],
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate per prompt.")] = 16,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per generate() call.")] = 8,
    device: Annotated[Device, typer.Option(help="Where the model runs.")] = Device.auto,
    dtype: Annotated[DType, typer.Option(help="Model dtype (auto: float32 on CPU, bfloat16 on "
                                              "CUDA).")] = DType.auto,
    seed: Annotated[int, typer.Option(help="Seed for sampling.")] = 0,
    sample: Annotated[bool, typer.Option("--sample/--greedy", help="Sample or decode greedily.")]
    = False,
    temperature: Annotated[float, typer.Option(min=0.0)] = 1.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    prompts_format: Annotated[PromptFormat, typer.Option(help="How to read --prompts.")]
    = PromptFormat.auto,
    strict: Annotated[bool, typer.Option("--strict/--lenient", help="Fail on bad capture input, "
                                         "or mark it missing and go on.")] = True,
    shard_requests: Annotated[int, typer.Option(min=1, help="Requests per shard file.")] = 1024,
    overwrite: Annotated[bool, typer.Option(help="Replace the capture already in --out (the old "
                                              "one stays until the new one has succeeded).")]
    = False,
    resume: Annotated[bool, typer.Option(help="Finish an unfinished (killed) capture in --out: "
                                         "same model, prompts and settings; done requests are "
                                         "skipped.")] = False,
    nproc: Annotated[int, typer.Option(min=1, help="Data-parallel processes on this node "
                                                    "(started by torch's launcher; each rank "
                                                    "writes its own shards).")]
    = 1,
    dispatch: Annotated[Dispatch, typer.Option(help="With --nproc > 1: local (each rank routes "
                                               "its tokens), gathered / gathered_padded (the "
                                               "routers see every rank's tokens, as vLLM's naive "
                                               "dispatch), ep (transformers' expert parallelism, "
                                               "all-to-all).")] = Dispatch.local,
    nnodes: Annotated[int, typer.Option(min=1, help="Machines in the job (run the same command "
                                                    "on each; --out on a shared file system).")]
    = 1,
    node_rank: Annotated[int | None, typer.Option(help="This machine's number, 0..nnodes-1 "
                                                  "(fixed ranks; node 0 hosts --rdzv-endpoint). "
                                                  "Left out: assigned by the rendezvous.")]
    = None,
    rdzv_endpoint: Annotated[str | None, typer.Option(help="HOST:PORT where the nodes meet "
                                                      "(needed with --nnodes > 1).")] = None,
    rdzv_id: Annotated[str | None, typer.Option(help="Job id, the same on every node (needed "
                                                "with --nnodes > 1).")] = None,
) -> None:
    """Capture the routes of every prompt and write one trace per request plus a summary."""
    # the converted arguments, for the ranks of --nproc (click's ctx.params holds the raw strings
    # of enum options under some typer versions)
    params = dict(locals())
    from .capture_checks import JobError, check_sampling
    from .folderlock import FolderLockedError, describe_os_error, probe
    from .prompts import PromptFileError, read_prompts

    if overwrite and resume:
        raise fail("--overwrite and --resume exclude each other: --resume finishes the capture "
                   "in --out, --overwrite replaces it")
    try:
        items = read_prompts(prompts, prompts_format.value)
        check_sampling(sample=sample, temperature=temperature, top_p=top_p)
    except (PromptFileError, JobError) as e:
        raise fail(str(e)) from None
    if out_dir.exists() and not out_dir.is_dir():
        raise fail(f"--out {out_dir}: exists and is not a folder")
    workers = nproc * nnodes
    if workers > 1 and "WORLD_SIZE" not in os.environ:
        try:  # refuse a second writer at once, before any rank starts
            probe(out_dir)
        except FolderLockedError as e:
            raise fail(str(e.strerror)) from None
        except OSError as e:
            raise fail(describe_os_error(e, f"--out {out_dir}")) from None
        raise typer.Exit(_launch(params, nproc, nnodes=nnodes, node_rank=node_rank,
                                 endpoint=rdzv_endpoint, run_id=rdzv_id))
    from .capture_job import CaptureJob, QuietJobError, run_capture_job
    from .files import TraceFileError
    from .integrations.hf import UnsupportedModelError

    rank = int(os.environ.get("RANK", "0"))
    dev = _resolve_device(device)
    job = CaptureJob(model=model, prompts=items, out_dir=out_dir, max_new_tokens=max_new_tokens,
                     batch_size=batch_size, device=dev, dtype=_resolve_dtype(dtype, dev),
                     seed=seed, sample=sample, temperature=temperature, top_p=top_p,
                     strict=strict, shard_requests=shard_requests, overwrite=overwrite,
                     resume=resume, dispatch=dispatch.value)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("capturing"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("requests"), TimeElapsedColumn(), console=err,
                        disable=not err.is_terminal or rank != 0 or len(items) < 2)
    try:
        with progress:
            task = progress.add_task("capture", total=len(items))
            result = run_capture_job(job, advance=lambda n: progress.advance(task, n))
    except QuietJobError:
        # rank 0 reports it: leave after it (the launcher stops the other ranks as soon as one
        # exits with an error, and would stop rank 0 before it has said why)
        time.sleep(QUIET_RANK_GRACE_S)
        raise typer.Exit(2) from None
    except (JobError, UnsupportedModelError, TraceFileError) as e:
        raise fail(str(e)) from None
    if result.rank != 0:
        return
    if result.already_complete:
        out.print(f"{out_dir} already holds the finished capture (run {result.run_id}); nothing "
                  "to resume")
        return
    summary = result.summary
    print_summary(summary, title=f"routecap capture -> {out_dir}")
    resumed = (f" ({result.resumed_requests} were already written and kept)"
               if result.resumed_requests else "")
    out.print(f"wrote {summary.num_requests} traces{resumed} in {len(result.shards)} shard(s), "
              f"manifest.json and summary.json to {out_dir}", markup=False)


def _launch(params: dict, nproc: int, *, nnodes: int, node_rank: int | None, endpoint: str | None,
            run_id: str | None) -> int:
    """Re-run this command as ``nproc`` ranks on this node through torch's launcher."""
    from .launch import LaunchError, Rendezvous, cli_rank, launch

    try:  # each rank runs this command's function with the values parsed here
        failed = launch(cli_rank, nproc, args=("capture", params),
                        rdzv=Rendezvous(nnodes=nnodes, node_rank=node_rank, endpoint=endpoint,
                                        run_id=run_id))
    except LaunchError as e:
        raise fail(str(e)) from None
    if not failed:
        return 0
    codes = {rank: f.exitcode for rank, f in sorted(failed.items())}
    unexpected = [(rank, f) for rank, f in sorted(failed.items()) if f.exitcode != 2]
    if unexpected:  # 2: a rank already printed its one-line error
        rank, f = unexpected[0]
        fail(f"rank {rank} failed (exit code {f.exitcode}): {f.message}"
             + (f"; ranks exited with codes {codes}" if len(codes) > 1 else ""))
    if 2 in codes.values():
        return 2
    return next((c for c in codes.values() if c > 0), 1)


@app.command()
def show(
    traces: Annotated[Path, typer.Argument(help="A trace folder or a trace file.")],
    request: Annotated[str | None, typer.Option(help="Print one request's routes token by "
                                                     "token.")] = None,
    limit: Annotated[int, typer.Option(min=0, help="Rows to print with --request (0: all).")]
    = 64,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer folder to show token text "
                                                       "(automatic for built-in models).")] = None,
) -> None:
    """Print the summary of existing traces, or one request's routes."""
    from .analysis import summarize
    from .files import TraceFileError, open_traces

    try:
        ts = open_traces(traces)
        if request is None:
            summary = summarize(ts)  # reads, and so verifies, every shard
            status = ts.status(checked=True)
        else:
            trace = ts.get(request)
    except TraceFileError as e:
        raise fail(str(e)) from None
    except KeyError as e:
        ids = ts.request_ids()
        raise fail(f"{e.args[0]}; known ids start with {ids[:5]}") from None
    if request is None:
        if as_json:
            out.print_json(json.dumps({**summary.to_dict(), "capture": status}))
        else:
            print_summary(summary, title=f"routecap traces in {traces}")
            if not ts.complete:
                err.print("note: the capture of these traces did not finish (resume it with "
                          "routecap capture --resume); every finished shard was read",
                          markup=False)
        return
    print_request(trace, limit, token_decoder(trace, tokenizer))


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="A trace folder or file, or a JSONL of records.")],
    dst: Annotated[Path, typer.Argument(help="Where to write (a folder for trace, else JSONL).")],
    to: Annotated[Format, typer.Option("--to", help="Output format.")],
    from_: Annotated[Format | None, typer.Option("--from", help="Input format (guessed when "
                                                  "left out).")] = None,
    model_config: Annotated[Path | None, typer.Option(help="A model folder or config.json, for "
                                                      "the router shape the engine formats "
                                                      "leave out.")] = None,
    num_layers: Annotated[int | None, typer.Option(help="All decoder layers (engine formats).")]
    = None,
    moe_layers: Annotated[str | None, typer.Option(help="MoE layer numbers, e.g. 1,2,3.")] = None,
    num_experts: Annotated[int | None, typer.Option(help="E.")] = None,
    top_k: Annotated[int | None, typer.Option(help="K.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace DST.")] = False,
    wire_mode: Annotated[WireMode, typer.Option(
        help="Codec mode of --to wire records: auto (order kept), or set / entropy (each row "
             "as a set, the router's order dropped; entropy is the smallest on skewed routes, "
             "slower to encode and decode).")] = WireMode.auto,
) -> None:
    """Convert between trace files, routecap wire JSONL, SGLang meta_info and vLLM records."""
    from .codec import CodecError
    from .convert import ConvertError, RouterShape, count_records, guess_format
    from .convert import convert as run
    from .files import TraceFileError
    from .folderlock import FolderLockedError, describe_os_error

    try:
        src_fmt = from_.value if from_ is not None else guess_format(src)
        shape = None
        if model_config is not None:
            shape = RouterShape.from_config(model_config)
        elif any(v is not None for v in (num_layers, moe_layers, num_experts, top_k)):
            if None in (num_layers, moe_layers, num_experts, top_k):
                raise ConvertError("give all of --num-layers, --moe-layers, --num-experts and "
                                   "--top-k (or --model-config)")
            try:
                layers = tuple(int(x) for x in moe_layers.split(","))
            except ValueError:
                raise ConvertError(f"--moe-layers: expected numbers like 1,2,3, got "
                                   f"{moe_layers!r}") from None
            shape = RouterShape(num_layers=num_layers, moe_layers=layers,
                                num_experts=num_experts, top_k=top_k)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        total = count_records(src, src_fmt) if err.is_terminal else None
        progress = Progress(TextColumn("converting"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("traces"), console=err,
                            disable=not err.is_terminal or not total or total < 2)
        with progress:
            task = progress.add_task("convert", total=total)
            n = run(src, dst, src_format=src_fmt, dst_format=to.value, shape=shape,
                    overwrite=overwrite, on_trace=lambda: progress.advance(task),
                    wire_mode=wire_mode.value)
    except FolderLockedError as e:
        raise fail(str(e.strerror)) from None
    except FileExistsError as e:
        raise fail(f"{e}; pass --overwrite or choose another destination") from None
    except (ConvertError, TraceFileError, CodecError, ValueError) as e:
        raise fail(str(e)) from None
    except OSError as e:
        raise fail(describe_os_error(e, f"writing {dst}")) from None
    out.print(f"converted {n} traces: {src} ({src_fmt}) -> {dst} ({to.value})", markup=False)


class PlacementFormat(str, Enum):
    sglang = "sglang"
    vllm = "vllm"
    routecap = "routecap"


@app.command()
def report(
    traces: Annotated[Path, typer.Argument(help="A trace folder or file.")],
    out_path: Annotated[Path, typer.Option("--out", help="The HTML file to write.")]
    = Path("report.html"),
    vs: Annotated[Path | None, typer.Option(help="Traces of the same requests to compare with "
                                                 "(e.g. a training re-capture).")] = None,
    ep_size: Annotated[int | None, typer.Option(min=1, help="Expert-parallel size G for the "
                                                "placement section (default: 8, 4 or 2).")] = None,
    redundant: Annotated[int, typer.Option(min=0, help="Redundant expert slots R.")] = 0,
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer folder for token text "
                                                       "(automatic for built-in models).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --out.")] = False,
) -> None:
    """Write one self-contained HTML report (expert load, positions, co-activation, placement)."""
    from .report.commands import report_command

    report_command(traces=traces, out_path=out_path, vs=vs, ep_size=ep_size, redundant=redundant,
                   tokenizer=tokenizer, overwrite=overwrite, out=out, err=err)


@app.command()
def placement(
    traces: Annotated[Path, typer.Argument(help="A trace folder or file.")],
    ep_size: Annotated[int, typer.Option(min=1, help="Expert-parallel size G (GPUs).")],
    out_path: Annotated[Path, typer.Option("--out", help="The placement file to write.")],
    redundant: Annotated[int, typer.Option(min=0, help="Redundant expert slots R.")] = 0,
    fmt: Annotated[PlacementFormat, typer.Option("--format", help="sglang: the file of "
                                                 "--init-expert-location; vllm: EplbState's maps; "
                                                 "routecap: the map with loads.")]
    = PlacementFormat.sglang,
    num_layers: Annotated[int | None, typer.Option(help="All decoder layers, for --format sglang "
                                                   "(default: the highest MoE layer + 1).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --out.")] = False,
) -> None:
    """Plan a balanced expert placement from captured load, write it for an engine and print it."""
    from .report.commands import placement_command

    placement_command(traces=traces, ep_size=ep_size, redundant=redundant, out_path=out_path,
                      fmt=fmt.value, num_layers=num_layers, overwrite=overwrite, out=out, err=err)


@app.command()
def doctor() -> None:
    """Report versions, the codec's fast path, and whether the vLLM plugin's fix is active."""
    import platform

    from . import codec

    rows: list[tuple[str, str]] = [("routecap", __version__),
                                   ("python", platform.python_version())]
    for name in ("torch", "transformers", "numpy", "safetensors", "zstandard", "numba"):
        try:
            mod = __import__(name)
            version = getattr(mod, "__version__", "?")
            if name == "torch":
                version += f" (CUDA {'available' if mod.cuda.is_available() else 'not available'})"
            rows.append((name, version))
        except ImportError:
            rows.append((name, "not installed"))
    rows.append(("codec kernels", "numba (fast)" if codec._HAVE_NUMBA else
                 "numpy fallback (install numba for speed)"))
    from .integrations.vllm import plugin_status

    st = plugin_status()
    if st.get("vllm") is None:
        rows.append(("vLLM", "not installed"))
    else:
        rows.append(("vLLM", str(st["vllm"])))
        rows.append(("vLLM plugin entry point", st.get("entry_point") or "not registered "
                     "(reinstall routecap)"))
        rows.append(("VLLM_PLUGINS allows it", "yes" if st["enabled_by_env"] else
                     f"no (VLLM_PLUGINS={st['vllm_plugins_env']!r})"))
        active = st.get("patched") and st["enabled_by_env"] and st.get("entry_point")
        rows.append(("DP capture fix", ("active: " if active else "not active: ") +
                     str(st.get("reason", ""))))
    try:
        import sglang  # noqa: F401

        rows.append(("SGLang", getattr(sglang, "__version__", "?")))
    except ImportError:
        rows.append(("SGLang", "not installed"))
    t = Table(title="routecap doctor", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, v)
    out.print(t)


@app.command()
def diff(
    a: Annotated[Path, typer.Argument(help="Trace folder (or file) A: the reference, e.g. inference.")],
    b: Annotated[Path, typer.Argument(help="Trace folder (or file) B: the same requests, e.g. a "
                                           "training re-capture.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the agreement as JSON.")] = False,
    strict: Annotated[bool, typer.Option(help="A request whose tokens differ between A and B is an "
                                              "error (default: compare up to the first "
                                              "difference).")] = False,
) -> None:
    """Routing agreement of two captures of the same requests, per MoE layer and overall."""
    from .diff import diff_traces
    from .files import TraceFileError

    try:
        g = diff_traces(a, b, diverged="error" if strict else "prefix")
    except (TraceFileError, ValueError) as e:
        raise fail(str(e)) from None
    if as_json:
        out.print_json(json.dumps(g.to_dict()))
    else:
        out.print(g.table(title=f"routing agreement: {a} vs {b}"))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
