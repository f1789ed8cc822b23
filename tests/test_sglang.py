"""SGLang's meta_info["routed_experts"]: byte-exact round trips, start offsets, errors, fuzz."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from fuzzing import fuzz_rng, mutate, report_failure

from routecap.integrations.sglang import from_sglang, to_sglang


def sglang_meta(T=7, A=4, K=2, E=16, moe=(0, 2, 3), start=0, prompt=5, seed=0):
    rng = np.random.default_rng(seed)
    arr = np.zeros((T, A, K), "<i4")
    for t in range(T):
        for layer in moe:
            arr[t, layer] = rng.permutation(E)[:K]
    return {"id": "req-1", "routed_experts": base64.b64encode(arr.tobytes()).decode(),
            "routed_experts_start_len": start, "prompt_tokens": prompt,
            "completion_tokens": T + start + 1 - prompt}, arr


def test_roundtrip_byte_exact_and_metadata():
    meta, arr = sglang_meta()
    t = from_sglang(meta, num_layers=4, top_k=2, moe_layers=[0, 2, 3], num_experts=16)
    assert (t.request_id, t.start, t.prompt_len, t.num_tokens) == ("req-1", 0, 5, 7)
    assert np.array_equal(t.expert_ids.astype(np.int32), arr[:, [0, 2, 3]])
    assert to_sglang(t) == meta["routed_experts"]


def test_start_len_is_the_absolute_position_of_row_zero():
    meta, _ = sglang_meta(T=4, start=3, prompt=5)
    t = from_sglang(meta, num_layers=4, top_k=2, moe_layers=[0, 2, 3], num_experts=16)
    assert (t.start, t.end) == (3, 7) and to_sglang(t) == meta["routed_experts"]


def test_shape_and_count_errors():
    meta, _ = sglang_meta()
    with pytest.raises(ValueError, match="not whole rows of 3 layers x top-2 int32"):
        from_sglang(meta, num_layers=3, top_k=2, moe_layers=[0, 2], num_experts=16)
    bad = dict(meta, completion_tokens=99)
    with pytest.raises(ValueError, match="7 rows, but prompt 5 \\+ completion 99"):
        from_sglang(bad, num_layers=4, top_k=2, moe_layers=[0, 2, 3], num_experts=16)
    with pytest.raises(ValueError, match="not valid base64"):
        from_sglang({"routed_experts": "%%%", "prompt_tokens": 1}, num_layers=4, top_k=2,
                    moe_layers=[0], num_experts=16)
    with pytest.raises(ValueError, match="give prompt_len"):
        from_sglang(meta["routed_experts"], num_layers=4, top_k=2, moe_layers=[0, 2, 3],
                    num_experts=16)


def test_fuzz_decoder_only_clean_errors():
    """50,000 mutated payloads: a trace or a ValueError, nothing else."""
    meta, arr = sglang_meta(T=5)
    raw = arr.tobytes()
    seed, rng = fuzz_rng(11)
    ok = 0
    for i in range(50_000):
        b = mutate(rng, raw)
        s = base64.b64encode(bytes(b)).decode()
        if rng.random() < 0.1:
            s = s[:int(rng.integers(len(s) + 1))]  # broken base64 too
        with report_failure(seed, i, s):
            try:
                from_sglang({"routed_experts": s, "prompt_tokens": 3}, num_layers=4, top_k=2,
                            moe_layers=[0, 2, 3], num_experts=16)
                ok += 1
            except ValueError:
                pass
    assert ok > 0
