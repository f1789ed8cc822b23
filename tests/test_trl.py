"""R3 for TRL's GRPOTrainer: 2 GRPO steps of the built-in model with and without routecap's replay.

The rollout plays an inference engine whose router numerics differ from training (its router
weights carry a small perturbation while it generates, as another kernel or precision would).
With replay, the ids every router used in the loss forward equal the ones captured in generation in
every cell; without, they differ.
"""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from routecap.builtin import load_builtin  # noqa: E402
from routecap.integrations.trl import R3GRPOTrainer  # noqa: E402


class PerturbedRollout(R3GRPOTrainer):
    """Generation with perturbed router weights (restored exactly afterwards)."""

    def _generate_single_turn(self, *args, **kwargs):
        routers = [s.module.weight for s in self._r3_info.sites]
        saved = [w.detach().clone() for w in routers]
        g = torch.Generator().manual_seed(int(self.state.global_step))
        with torch.no_grad():
            for w in routers:
                w.add_(torch.randn(w.shape, generator=g) * 0.03)
        try:
            return super()._generate_single_turn(*args, **kwargs)
        finally:
            with torch.no_grad():
                for w, v in zip(routers, saved):
                    w.copy_(v)


def _train(tmp_path, replay: bool, trainer_cls=PerturbedRollout, **cfg):
    model, tok = load_builtin("tiny-qwen3-moe")
    model.train()
    prompts = ["Explain routing replay", "The quick brown fox", "def fibonacci(n):", "17 * 23 ="]
    ds = datasets.Dataset.from_dict({"prompt": prompts * 2})

    def reward(completions, **kw):
        return [float(c.count("e")) - 0.1 * len(c) for c in completions]

    args = trl.GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                          num_generations=4, max_completion_length=8, max_steps=2, logging_steps=1,
                          report_to=[], use_cpu=True, learning_rate=1e-3, save_strategy="no", seed=0,
                          **cfg)
    tr = trainer_cls(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                     r3_replay=replay, r3_diagnostics=True)
    tr.train()
    return tr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """2 optimizer steps on one rollout (num_iterations=2): TRL then also runs its old-log-prob
    forward, which must replay too. Counts the replay blocks each run opened."""
    import routecap.replay

    out = {}
    for r in (True, False):
        real, calls = routecap.replay.replay, []

        def counting(*args, _real=real, _calls=calls, **kwargs):
            _calls.append(torch.is_grad_enabled())
            return _real(*args, **kwargs)

        routecap.replay.replay = counting
        try:
            tr = _train(tmp_path_factory.mktemp(f"grpo{int(r)}"), r, num_iterations=2)
        finally:
            routecap.replay.replay = real
        out[r] = (tr, calls)
    return out


def test_with_replay_the_loss_forward_uses_the_generation_routes_in_every_cell(runs):
    tr, calls = runs[True]
    # one old-log-prob forward (no grad) for the rollout, then the 2 loss forwards
    assert calls == [False, True, True]
    h = tr.r3_history
    assert len(h) == 2  # 2 GRPO steps, one loss forward each
    for rec in h:
        assert rec["cells"] > 0 and rec["replayed_cells"] == rec["cells"]  # every captured cell
        assert rec["route_differ_fraction"] == 0.0 and rec["token_differ_fraction"] == 0.0


def test_without_replay_they_differ(runs):
    tr, calls = runs[False]
    assert calls == []
    h = tr.r3_history
    assert sum(rec["route_differ_fraction"] for rec in h) > 0
    assert all(rec["replayed_cells"] == 0 for rec in h)
    # the token-level gap shrinks under replay (same routes, only the router weights' numerics);
    # compared on the first loss forward, whose weights are still the rollout's
    kl = {r: runs[r][0].r3_history[0]["k3_kl"] for r in (True, False)}
    assert kl[False] > kl[True]


def test_refuses_rollout_paths_it_cannot_see(tmp_path):
    with pytest.raises(ValueError, match="routecap R3 for TRL: a custom rollout_func are not supported"):
        model, tok = load_builtin("tiny-qwen3-moe")
        args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                              max_completion_length=4, report_to=[], use_cpu=True)
        R3GRPOTrainer(model=model, reward_funcs=lambda completions, **k: [0.0] * len(completions),
                      args=args, train_dataset=datasets.Dataset.from_dict({"prompt": ["a"] * 4}),
                      processing_class=tok, rollout_func=lambda prompts, trainer: {})
