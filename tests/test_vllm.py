"""vLLM adapters (byte-exact round trips) and the plugin's logic, without vLLM installed.

The plugin is tested against a stand-in capturer module written here that behaves like vLLM
0.16-0.19's (the assertion) and like 0.20's (either layout); tests/vllm_stage/ runs it against the real
vLLM 0.19.1 (scripts/vllm-stage.sh).
"""

from __future__ import annotations

import base64
import io
import types

import numpy as np
import pytest
import torch

from fuzzing import fuzz_rng, mutate, report_failure

from routecap.integrations import vllm as rv
from routecap.layout import LayoutError


def vllm_array(T=6, A=5, K=4, E=32, moe=(1, 2, 4), seed=0, dtype=np.int32):
    """What vLLM returns: [T, A, K] over all layers, dense layers zero."""
    rng = np.random.default_rng(seed)
    out = np.zeros((T, A, K), dtype)
    for t in range(T):
        for layer in moe:
            out[t, layer] = rng.permutation(E)[:K]
    return out


def test_from_vllm_drops_dense_layers_and_roundtrips_byte_exact():
    a = vllm_array()
    t = rv.from_vllm(a, moe_layers=[1, 2, 4], num_experts=32, request_id="r", prompt_len=4)
    assert t.moe_layers == (1, 2, 4) and t.num_layers == 3 and t.missing is None
    assert np.array_equal(t.expert_ids.astype(np.int32), a[:, [1, 2, 4]])
    back = rv.to_vllm(t)
    assert back.dtype == a.dtype and back.tobytes() == a.tobytes()


def test_zero_rows_and_minus_one_rows_are_missing_not_expert_zero():
    a = vllm_array()
    a[2, 2] = 0   # a capture that never ran (monolithic kernel): K zeros cannot be a route
    t = rv.from_vllm(a, moe_layers=[1, 2, 4], num_experts=32, request_id="r", prompt_len=4)
    assert t.missing[2].tolist() == [False, True, False] and t.num_missing == 1
    assert rv.to_vllm(t).tobytes() == a.tobytes()
    b = vllm_array()
    b[3, 4] = -1  # routecap's plugin in lenient mode
    t = rv.from_vllm(b, moe_layers=[1, 2, 4], num_experts=32, request_id="r", prompt_len=4)
    assert t.missing[3].tolist() == [False, False, True]
    assert rv.to_vllm(t).tobytes() == b.tobytes()


def test_b64npy_roundtrip_byte_exact_for_each_dtype():
    for dtype in (np.int32, np.uint8, np.uint16):
        a = vllm_array(dtype=dtype)
        buf = io.BytesIO()
        np.save(buf, a)
        s = base64.b64encode(buf.getvalue()).decode()
        t = rv.from_vllm_b64npy(s, moe_layers=[1, 2, 4], num_experts=32, request_id="r",
                                prompt_len=4)
        assert rv.to_vllm_b64npy(t) == s


def test_adapter_errors():
    a = vllm_array()
    with pytest.raises(ValueError, match="layer 1 is not in moe_layers but holds non-zero ids"):
        rv.from_vllm(a, moe_layers=[2, 4], num_experts=32, request_id="r", prompt_len=4)
    with pytest.raises(ValueError, match="do not fit an array of 5 layers"):
        rv.from_vllm(a, moe_layers=[1, 7], num_experts=32, request_id="r", prompt_len=4)
    with pytest.raises(ValueError, match="expected an integer array"):
        rv.from_vllm(a.astype(float), moe_layers=[1], num_experts=32, request_id="r",
                     prompt_len=4)
    with pytest.raises(ValueError, match="not base64 of a .npy array"):
        rv.from_vllm_b64npy("!!!", moe_layers=[1], num_experts=32, request_id="r", prompt_len=4)
    with pytest.raises(ValueError, match="not base64 of a .npy array"):
        rv.from_vllm_b64npy(base64.b64encode(b"not npy").decode(), moe_layers=[1],
                            num_experts=32, request_id="r", prompt_len=4)


# ---- the plugin, against stand-in capturers ---------------------------------------------------
def _stand_in(kind: str):
    """A module shaped like vllm's routed_experts_capturer (our own code, same behaviour)."""
    mod = types.SimpleNamespace()
    state = {"ctx": None}
    mod.get_forward_context = lambda: state["ctx"]

    class RoutedExpertsCapturer:
        def __init__(self):
            self._device_buffer = None

        def capture(self, layer_id, topk_ids):
            dp = mod.get_forward_context().dp_metadata
            n = topk_ids.shape[0]
            if dp is None:
                s, e = 0, n
            else:
                counts = dp.num_tokens_across_dp_cpu
                mine = int(counts[self.dp_rank])
                if kind == "0.19":  # the seed's logic
                    cumsum = torch.cumsum(counts, dim=0)
                    assert cumsum[-1] == n
                    e = int(cumsum[self.dp_rank])
                    s = e - mine
                else:  # 0.20: either layout
                    s = int(counts[:self.dp_rank].sum()) if n == int(counts.sum()) else 0
                    e = s + mine
            self._device_buffer[:e - s, layer_id] = topk_ids[s:e]

    mod.RoutedExpertsCapturer = RoutedExpertsCapturer
    mod._state = state
    return mod


def _ctx(counts):
    c = torch.tensor(counts, dtype=torch.int32)
    return types.SimpleNamespace(dp_metadata=types.SimpleNamespace(
        num_tokens_across_dp_cpu=c, max_tokens_across_dp_cpu=c.max()))


def test_seed_bug_detected_by_behaviour():
    assert rv.has_seed_bug(_stand_in("0.19")) is True
    assert rv.has_seed_bug(_stand_in("0.20")) is False
    assert rv.has_seed_bug(types.SimpleNamespace()) is None  # not the capturer we know


def test_patched_capture_takes_this_ranks_rows(monkeypatch):
    mod = _stand_in("0.19")
    monkeypatch.setattr(rv, "_capturer_module", lambda: mod)
    cap = mod.RoutedExpertsCapturer()
    cap._device_buffer = torch.full((8, 2, 2), 99, dtype=torch.int32)
    cap.dp_rank = 1
    ids = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]], dtype=torch.int32)
    mod._state["ctx"] = _ctx([2, 3])
    with pytest.raises(AssertionError):  # the seed: local rows under DP crash vLLM's capture
        cap.capture(0, ids[2:])
    rv._routecap_capture(cap, 0, ids[2:])  # local layout: all 3 rows are this rank's
    assert cap._device_buffer[:3, 0].tolist() == [[4, 5], [6, 7], [8, 9]]
    rv._routecap_capture(cap, 1, ids)  # gathered layout: rows 2..4
    assert cap._device_buffer[:3, 1].tolist() == [[4, 5], [6, 7], [8, 9]]
    mod._state["ctx"] = types.SimpleNamespace(dp_metadata=None)
    rv._routecap_capture(cap, 0, ids[:1])
    assert cap._device_buffer[0, 0].tolist() == [0, 1]
    rv._routecap_capture(cap, 5, ids)  # a layer past the buffer (MTP): ignored, as vLLM does


def test_patched_capture_refuses_mismatched_rows_or_marks_them_missing(monkeypatch):
    mod = _stand_in("0.19")
    monkeypatch.setattr(rv, "_capturer_module", lambda: mod)
    cap = mod.RoutedExpertsCapturer()
    cap._device_buffer = torch.full((8, 1, 2), 7, dtype=torch.int32)
    cap.dp_rank = 1
    mod._state["ctx"] = _ctx([2, 3])
    ids = torch.zeros((4, 2), dtype=torch.int32)
    with pytest.raises(rv.RoutecapVLLMError, match="N=4 rows, which fits no layout.*"
                       "local: N = n_me = 3; gathered: N = sum\\(n\\) = 5"):
        rv._routecap_capture(cap, 0, ids)
    monkeypatch.setenv("ROUTECAP_VLLM_LENIENT", "1")
    rv._routecap_capture(cap, 0, ids)
    assert cap._device_buffer[:3, 0].tolist() == [[-1, -1]] * 3  # missing, never stale 7s
    assert issubclass(rv.RoutecapVLLMError, RuntimeError) and LayoutError is not None


def test_register_never_raises_and_reports(monkeypatch):
    def boom():
        raise RuntimeError("broken install")

    monkeypatch.setattr(rv, "_install", boom)
    rv.register()  # logged, not raised
    assert rv.PLUGIN_STATUS["patched"] is False and "broken install" in rv.PLUGIN_STATUS["reason"]


def test_plugin_status_without_vllm(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_vllm(name, *a, **k):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("no vllm")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    st = rv.plugin_status()
    assert st["patched"] is False and st["vllm"] is None
    assert st["entry_point"] == "routecap.integrations.vllm:register"


# ---- fuzz of the decoders ----------------------------------------------------------------------
def test_fuzz_b64npy_decoder_only_clean_errors():
    """50,000 mutated base64 .npy strings: a trace or a ValueError, nothing else."""
    seed, rng = fuzz_rng(5)
    seeds = []
    for dtype in (np.int32, np.uint8):
        buf = io.BytesIO()
        np.save(buf, vllm_array(dtype=dtype, T=3))
        seeds.append(buf.getvalue())
    ok = 0
    for i in range(50_000):
        b = mutate(rng, seeds[i % 2])
        s = base64.b64encode(bytes(b)).decode()
        with report_failure(seed, i, s):
            try:
                rv.from_vllm_b64npy(s, moe_layers=[1, 2, 4], num_experts=32, request_id="r",
                                    prompt_len=2)
                ok += 1
            except ValueError:
                pass
    assert ok > 0


def test_from_request_output_uses_the_model_config():
    from tiny_models import tiny_config

    cfg = tiny_config("deepseek_v3")  # 3 layers, layer 0 dense, 16 experts, top-4
    arr = vllm_array(T=5, A=3, K=4, E=16, moe=(1, 2))
    out = types.SimpleNamespace(
        request_id="req", prompt_token_ids=[5, 6, 7],
        outputs=[types.SimpleNamespace(index=0, token_ids=[8, 9, 10], routed_experts=arr)])
    (t,) = rv.from_request_output(out, cfg)
    assert t.moe_layers == (1, 2) and t.num_experts == 16 and t.prompt_len == 3
    assert t.token_ids.tolist() == [5, 6, 7, 8, 9]  # the last generated token never ran
    assert rv.to_vllm(t).tobytes() == arr.tobytes()
    out.outputs[0].routed_experts = None
    with pytest.raises(ValueError, match="no routed_experts"):
        rv.from_request_output(out, cfg)


def test_mixed_zero_and_minus_one_missing_rows_roundtrip_byte_exact():
    a = vllm_array()
    a[2, 2] = 0   # a skipped capture
    a[3, 4] = -1  # the plugin's lenient mark
    t = rv.from_vllm(a, moe_layers=[1, 2, 4], num_experts=32, request_id="r", prompt_len=4)
    assert t.num_missing == 2
    assert rv.to_vllm(t).tobytes() == a.tobytes()


def _stand_in_with_buffers(kind):
    mod = _stand_in(kind)
    cls = mod.RoutedExpertsCapturer

    def init_buffer(self, n, layers, k):
        self._device_buffer = torch.zeros((n, layers, k), dtype=torch.int32)
        self._host_buffer_view = np.zeros((2 * n, layers, k), np.int32)

    def save_captured_experts(self, indices):
        self._host_buffer_view[indices] = self._device_buffer[:len(indices)].numpy()

    def clear_buffer(self):
        self._device_buffer.zero_()

    cls.init_buffer, cls.save_captured_experts, cls.clear_buffer = (
        init_buffer, save_captured_experts, clear_buffer)
    return mod


@pytest.mark.parametrize("K", [1, 2])
def test_patched_plugin_rows_not_captured_read_minus_one_never_stale(monkeypatch, K):
    # vLLM's buffer starts at 0 and keeps the last step's rows: a layer that does not capture in a
    # step (K = 1: zero reads as expert 0) would hand out a valid-looking route
    mod = _stand_in_with_buffers("0.19")
    monkeypatch.setattr(rv, "_capturer_module", lambda: mod)
    import sys
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__="0.19.1"))
    cls = mod.RoutedExpertsCapturer
    status = rv._install()
    assert status["patched"] and status["fills_missing"]
    cap = cls()
    cap.init_buffer(4, 2, K)
    cap.dp_rank = 0
    mod._state["ctx"] = types.SimpleNamespace(dp_metadata=None)
    ids = torch.arange(3 * K, dtype=torch.int32).view(3, K) + 1
    cap.capture(0, ids)       # step 1: both layers capture
    cap.capture(1, ids)
    cap.save_captured_experts(np.array([0, 1, 2]))
    cap.capture(0, ids + 5)   # step 2: layer 1 skipped
    cap.save_captured_experts(np.array([3, 4, 5]))
    host = cap._host_buffer_view
    assert (host[3:6, 0] == (ids + 5).numpy()).all()
    assert (host[3:6, 1] == -1).all()    # not step 1's routes, not zeros
    assert (host[6:, :] == -1).all()     # never written
    t = rv.from_vllm(host[3:6], moe_layers=[0, 1], num_experts=64, request_id="r", prompt_len=1)
    assert t.missing[:, 1].all() and not t.missing[:, 0].any()
