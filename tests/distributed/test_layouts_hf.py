"""Every layout under torch.distributed (gloo, CPU): 2 and 4 processes.

For each layout the routes every rank captured, gathered, must equal a single-process run of the
same model over the combined batch (uneven batch sizes, one DP rank with zero requests running a
dummy batch). The generated tokens must match too, which shows the dispatch is exact.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from distributed.launch import run_ranks, transformers_has_ep  # noqa: E402
from distributed.worker import left_pad, requests  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

from routecap.files import load_file  # noqa: E402
from routecap.integrations.hf import capture_generate  # noqa: E402

pytestmark = pytest.mark.distributed

SCENARIOS = [
    # (layout, world, tp, requests per DP rank)
    ("gathered", 2, 1, [3, 0]),
    ("gathered", 4, 1, [1, 3, 0, 2]),
    ("gathered_padded", 2, 1, [0, 4]),
    ("gathered_padded", 4, 2, [3, 0]),
    ("tp_sharded", 2, 2, [3]),
    ("tp_sharded", 4, 2, [0, 2]),
]


def _reference(counts, seed=0, max_new_tokens=4):
    model = tiny_model("qwen3_moe", seed=seed)
    everything = [r for per_rank in requests(seed, counts) for r in per_rank]
    ids, mask = left_pad([p for _, p in everything])
    traces, seq = capture_generate(model, ids, mask, request_ids=[r for r, _ in everything],
                                   max_new_tokens=max_new_tokens, do_sample=False,
                                   eos_token_id=[], pad_token_id=0)
    W = ids.shape[1]
    gen = {r: seq[b, W:].tolist() for b, (r, _) in enumerate(everything)}
    return {t.request_id: t for t in traces}, gen


def _check(out: Path, world: int, counts: list[int]):
    ref, ref_gen = _reference(counts)
    got = {}
    infos = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    for info in infos:
        f = out / f"rank{info['rank']}.safetensors"
        if info["publishes"]:
            assert info["num_traces"] == len(info["request_ids"])
        else:
            assert info["num_traces"] == 0 and not f.exists()  # nothing returned twice
        if f.exists():
            for t in load_file(f):
                assert t.request_id not in got
                got[t.request_id] = t
        # the tokens this rank generated are the single-process ones
        for b, rid in enumerate(info["request_ids"]):
            assert info["sequences"][b][-4:] == ref_gen[rid], rid
    assert sorted(got) == sorted(ref)
    for rid, t in got.items():
        r = ref[rid]
        assert np.array_equal(t.token_ids, r.token_ids), rid
        assert t.missing is None, rid
        assert np.array_equal(t.expert_ids, r.expert_ids), rid
        assert dataclasses.replace(t, model=r.model).equals(r), rid  # EP loads from a folder
    return infos


@pytest.mark.parametrize("layout,world,tp,counts", SCENARIOS,
                         ids=[f"{s[0]}-w{s[1]}-tp{s[2]}" for s in SCENARIOS])
def test_layout_under_distributed(tmp_path, layout, world, tp, counts):
    run_ranks(HERE / "worker.py", ["--layout", layout, "--tp", str(tp), "--out", str(tmp_path),
                                   "--counts", ",".join(map(str, counts))], world)
    infos = _check(tmp_path, world, counts)
    assert len({i["steps"] for i in infos}) == 1  # every rank ran the same number of forwards


@pytest.mark.parametrize("layout,counts", [("gathered_padded", [3, 1]), ("tp_sharded", [2, 3])])
def test_tp_groups_strided_across_the_world(tmp_path, layout, counts):
    # world rank = tp_rank * DP + dp_rank: the world all-gather of gathered_padded returns shards
    # in world order, which is not the (dp_rank, tp_rank) order of the layout; the rows handed
    # back (and captured) must still be each rank's own
    run_ranks(HERE / "worker.py", ["--layout", layout, "--tp", "2", "--out", str(tmp_path),
                                   "--counts", ",".join(map(str, counts)), "--strided-tp"], 4)
    infos = _check(tmp_path, 4, counts)
    assert {(i["rank"], i["dp_rank"], i["tp_rank"]) for i in infos} == {
        (0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)}


@pytest.mark.skipif(not transformers_has_ep(), reason="this transformers has no all-to-all EP")
@pytest.mark.parametrize("world,counts", [(2, [3, 0]), (4, [2, 0, 3, 1])])
def test_local_layout_with_transformers_expert_parallelism(tmp_path, world, counts):
    model = tiny_model("qwen3_moe", seed=0)
    model.save_pretrained(tmp_path / "model")
    run_ranks(HERE / "worker.py", ["--layout", "local", "--out", str(tmp_path), "--counts",
                                   ",".join(map(str, counts)), "--ep-model",
                                   str(tmp_path / "model")], world)
    _check(tmp_path, world, counts)


def _transformers_has_tp_style_ep() -> bool:
    try:
        from transformers.distributed import DistributedConfig

        DistributedConfig(tp_size=2, enable_expert_parallel=True)
    except Exception:  # noqa: BLE001
        return False
    return not transformers_has_ep()


@pytest.mark.skipif(not _transformers_has_tp_style_ep(),
                    reason="only transformers 5.17-style expert parallelism remaps router outputs")
def test_router_outputs_remapped_to_local_ids_are_refused(tmp_path):
    model = tiny_model("qwen3_moe", seed=0)
    model.save_pretrained(tmp_path / "model")
    outs = run_ranks(HERE / "ep517_worker.py", [str(tmp_path / "model")], 2)
    for o in outs:
        assert "REFUSED:" in o.stdout and "EpRouterParallel" in o.stdout, o.stdout
        assert "this rank's local ids" in o.stdout
