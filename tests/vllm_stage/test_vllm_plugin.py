"""routecap's vLLM plugin against the real vLLM 0.19.1 (scripts/vllm-stage.sh installs it).

Skipped when vLLM is not installed. Each case runs in a fresh interpreter: the plugin patches a
class, and vLLM loads plugins once per process.

It builds vLLM's own ``RoutedExpertsCapturer`` with a CPU buffer and a forward context carrying
DP metadata (counts [2, 3], this is DP rank 1), and shows:

* unpatched, the local layout (3 rows) fails exactly as in the seed: a bare AssertionError;
* loaded through vLLM's plugin loader, routecap takes the rank's rows in the local (3 rows) and
  gathered (5 rows) layouts, and refuses a mismatched shape (4 rows) with an error naming every
  size (or marks the rows missing with -1 in lenient mode);
* with ``VLLM_PLUGINS=""`` the plugin is not loaded and nothing changes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("vllm")

SETUP = textwrap.dedent("""
    import os, sys, logging, torch
    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    from vllm.model_executor.layers.fused_moe import routed_experts_capturer as rec
    from vllm.forward_context import ForwardContext, DPMetadata, override_forward_context

    def ctx(counts):
        n = torch.tensor(counts, dtype=torch.int32)
        return ForwardContext(no_compile_layers={}, attn_metadata={}, slot_mapping={},
                              dp_metadata=DPMetadata(max_tokens_across_dp_cpu=n.max(),
                                                     num_tokens_across_dp_cpu=n))

    cap = rec.RoutedExpertsCapturer()
    cap._device_buffer = torch.full((8, 2, 2), 77, dtype=torch.int32)
    cap.dp_rank = 1
    ids = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]], dtype=torch.int32)

    def run(n):
        with override_forward_context(ctx([2, 3])):
            cap.capture(0, ids[5 - n:] if n <= 3 else ids[:n])
        return cap._device_buffer[:3, 0].tolist()
""")


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", SETUP + textwrap.dedent(code)], env=e,
                          capture_output=True, text=True, timeout=300)


def test_unpatched_capture_fails_like_the_seed():
    r = python("""
        try:
            run(3)
        except AssertionError as e:
            print("ASSERTION", repr(e))
        print("GATHERED", run(5))
    """, VLLM_PLUGINS="")
    assert "ASSERTION AssertionError()" in r.stdout, r.stdout + r.stderr
    assert "GATHERED [[4, 5], [6, 7], [8, 9]]" in r.stdout


def test_plugin_loaded_by_vllm_fixes_local_and_gathered_and_refuses_mismatch():
    r = python("""
        from vllm.plugins import load_general_plugins
        load_general_plugins()
        print("LOCAL", run(3))
        cap._device_buffer.fill_(77)
        print("GATHERED", run(5))
        try:
            run(4)
        except Exception as e:
            print("MISMATCH", type(e).__name__, e)
    """)
    out = r.stdout + r.stderr
    assert "LOCAL [[4, 5], [6, 7], [8, 9]]" in out, out
    assert "GATHERED [[4, 5], [6, 7], [8, 9]]" in out, out
    assert "MISMATCH RoutecapVLLMError" in out and "N=4 rows, which fits no layout" in out
    assert "local: N = n_me = 3; gathered: N = sum(n) = 5" in out
    assert out.count("replaced RoutedExpertsCapturer.capture") == 1  # logged once


def test_plugin_lenient_marks_missing():
    r = python("""
        from vllm.plugins import load_general_plugins
        load_general_plugins()
        print("LENIENT", run(4))
    """, ROUTECAP_VLLM_LENIENT="1")
    assert "LENIENT [[-1, -1], [-1, -1], [-1, -1]]" in r.stdout, r.stdout + r.stderr


def test_doctor_reports_the_fix():
    r = subprocess.run([sys.executable, "-m", "routecap", "doctor"], capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, COLUMNS="200"))
    assert "0.19.1" in r.stdout and "DP capture fix" in r.stdout, r.stdout + r.stderr
    assert "active: the installed capture() asserts on local-layout rows" in r.stdout
