"""The golden capture test of tests/test_hf.py, on CUDA, for every supported architecture."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_hf import _check_golden, _prompts  # noqa: E402
from tiny_models import SUPPORTED, UNSORTED_TOPK, tiny_model  # noqa: E402

from routecap.builtin import load_builtin  # noqa: E402


@pytest.mark.parametrize("arch", SUPPORTED)
def test_golden_on_cuda_float32(arch):
    model = tiny_model(arch, seed=1).cuda()
    ids, mask = _prompts()
    flips, _ = _check_golden(model, ids.cuda(), mask.cuda(), unsorted=arch in UNSORTED_TOPK,
                             do_sample=False)
    assert flips == 0


def test_golden_builtin_on_cuda_bfloat16():
    # bf16 rounding in a padded, cached batch may flip near-ties; _check_golden accepts a flip only
    # where the router margin is below its tolerance, and we report how many there were
    model, tok = load_builtin("tiny-qwen3-moe", device="cuda", dtype=torch.bfloat16)
    enc = tok(["hello world", "x", "the quick brown fox jumps over", "routes"],
              return_tensors="pt", padding=True)
    flips, traces = _check_golden(model, enc["input_ids"].cuda(), enc["attention_mask"].cuda(),
                                  unsorted=False, max_new=8, do_sample=False)
    cells = sum(t.num_tokens * t.num_layers for t in traces)
    print(f"bf16 near-tie flips: {flips} of {cells} cells")
