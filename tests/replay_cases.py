"""Shared helpers of the replay tests: the architectures, what the experts received, perturbation.

Every architecture routecap captures is here: the seven golden ones (tiny_models) and the sweep
(extra_architectures) whose capture works, Llama 4 and DBRX included (their routers hold no ids in
their output: capture and replay both work at their final top-k, integrations.hf_topk).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
import transformers
from extra_architectures import CASES_BY_ID, CASES, ArchCase
from extra_architectures import tiny_model as extra_tiny_model
from tiny_models import SUPPORTED
from tiny_models import tiny_model as golden_tiny_model
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

#: sweep cases that stay refused by replay, with a fragment of the reason
REPLAY_REFUSED = {
    "phimoe": "sparsemixer",
    "deepseek_v4": "hash routing",
    "zaya": "skip expert as expert 0",
    "jetmoe": "no MoE block",
    "ernie4_5_vl_moe": "more than one MoE router per decoder layer",
    "switch_transformers": "encoder-decoder",
    "nllb_moe": "encoder-decoder",
}
#: the fast default runs these; the rest of the sweep is marked slow
FAST = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "glm4_moe",
        "llama4_text", "dbrx", "longcat_flash", "afmoe", "nemotron_h"}


@dataclass(frozen=True)
class ReplayCase:
    id: str
    golden: bool
    case: ArchCase | None = None

    def build(self, seed: int = 1) -> Any:
        if self.golden:
            return golden_tiny_model(self.id, seed=seed)
        return extra_tiny_model(self.case, seed=seed)


def _available(case: ArchCase) -> bool:
    return case.model_type in CONFIG_MAPPING_NAMES


def replay_cases() -> list:
    """pytest params: every architecture replay supports."""
    out = []
    for arch in SUPPORTED:
        marks = [] if arch in FAST else [pytest.mark.slow]
        out.append(pytest.param(ReplayCase(arch, True), id=arch, marks=marks))
    for case in CASES:
        case = case.for_version(transformers.__version__)
        if case.expect != "works" or case.id in REPLAY_REFUSED:
            continue
        marks = [] if case.id in FAST else [pytest.mark.slow]
        if not _available(case):
            marks.append(pytest.mark.skip(reason=f"transformers {transformers.__version__} has no "
                                                 f"{case.model_type!r}"))
        out.append(pytest.param(ReplayCase(case.id, False, case), id=case.id, marks=marks))
    return out


def refused_cases() -> list:
    out = []
    for cid, fragment in REPLAY_REFUSED.items():
        case = CASES_BY_ID[cid].for_version(transformers.__version__)
        marks = [] if cid in ("phimoe", "zaya") else [pytest.mark.slow]
        if not _available(case):
            marks.append(pytest.mark.skip(reason=f"no {case.model_type!r}"))
        out.append(pytest.param(ReplayCase(cid, False, case), fragment, id=cid, marks=marks))
    return out


# ---- what the experts actually received ---------------------------------------------------------
class ExpertsTap:
    """Records, per MoE layer, the (ids, weights) the experts of each block were called with.

    v5 experts are called ``experts(hidden, top_k_index, top_k_weights)``; Llama 4's experts run
    densely on inputs already scaled by the router's ``[N, E]`` scores, whose non-zero entries are
    then the experts a token reached (their ids, in ascending order, and the scores there).
    """

    def __init__(self, info: Any) -> None:
        self.info = info
        self.ids: dict[int, torch.Tensor] = {}
        self.weights: dict[int, torch.Tensor] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> ExpertsTap:
        for i, site in enumerate(self.info.sites):
            if type(site.module).__name__ == "Llama4Router":
                def hook(mod, args, out, i=i, K=site.top_k):
                    scores, logits_NE = out[0], out[1]
                    scores_NE = scores if scores.shape == logits_NE.shape else scores.transpose(0, 1)
                    nz_NE = scores_NE != 0
                    assert bool((nz_NE.sum(-1) == K).all()), "a token reached other than K experts"
                    ids = torch.sort(torch.topk(nz_NE.float(), K, dim=-1)[1], dim=-1)[0]
                    self._put(i, ids, scores_NE.gather(-1, ids))
                self.handles.append(site.module.register_forward_hook(hook))
                continue

            def pre(mod, args, kwargs, i=i):
                ids = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
                w = kwargs.get("top_k_weights", args[2] if len(args) > 2 else None)
                self._put(i, ids, w)
            self.handles.append(site.block.experts.register_forward_pre_hook(pre, with_kwargs=True))
        return self

    def _put(self, i: int, ids: torch.Tensor, w: torch.Tensor) -> None:
        assert i not in self.ids, f"experts of MoE layer {i} ran twice in one forward"
        self.ids[i] = ids.detach().reshape(ids.shape[0], -1).clone()
        self.weights[i] = w.detach().reshape(ids.shape[0], -1).clone()

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()

    def ids_NLK(self) -> torch.Tensor:
        missing = [s.layer for i, s in enumerate(self.info.sites) if i not in self.ids]
        assert not missing, f"the experts of layers {missing} never ran"
        return torch.stack([self.ids[i] for i in range(len(self.info.sites))], dim=1).long()

    def weights_NLK(self) -> torch.Tensor:
        return torch.stack([self.weights[i] for i in range(len(self.info.sites))], dim=1)


def perturb_routers_(model: Any, info: Any, scale: float, seed: int) -> None:
    """Add seeded Gaussian noise of ``scale`` times each router parameter's spread."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site in info.sites:
            for p in site.module.parameters():
                spread = float(p.float().std()) if p.numel() > 1 else 1.0
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale * (spread or 1.0))


def same_rows(a_NLK: torch.Tensor, b_NLK: torch.Tensor) -> torch.Tensor:
    """[N, L] True where the two rows hold the same set of ids."""
    return (a_NLK.sort(-1)[0] == b_NLK.sort(-1)[0]).all(-1)
