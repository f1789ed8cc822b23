"""GRPO with and without rollout routing replay (R3) on routecap's built-in MoE model, on CPU.

    PYTHONPATH=src python examples/grpo_r3.py [--steps 3] [--noise 0.01] [--sharpen 30]

TRL's GRPOTrainer generates with transformers and trains the same weights. To play an inference
engine whose router numerics differ from training (another kernel, another precision), the
rollout here runs with the router weights perturbed by ``--noise`` (restored exactly after each
rollout). For each step it prints, over the completions of the loss forward:

* route differ: fraction of (token, layer) cells where the experts the routers used in the loss
  forward differ from those captured in generation (R3 makes it 0);
* k3 KL: the k3 estimate of KL(rollout || training) over the completion tokens' log-probs, and the
  fraction of tokens whose probability ratio is beyond 2 either way.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from datasets import Dataset
from trl import GRPOConfig

from routecap.builtin import load_builtin
from routecap.integrations.trl import R3GRPOTrainer

PROMPTS = ["Explain routing replay", "The quick brown fox", "def fibonacci(n):", "17 * 23 =",
           "Once upon a time", "SELECT name FROM", "A haiku about GPUs:", "List three primes"]


class MismatchedRollout(R3GRPOTrainer):
    """The rollout's routers see perturbed weights (an inference engine with other numerics)."""

    noise = 0.03

    def _generate_single_turn(self, *args, **kwargs):
        routers = [s.module.weight for s in self._r3_info.sites]
        saved = [w.detach().clone() for w in routers]
        g = torch.Generator().manual_seed(1000 + int(self.state.global_step))
        with torch.no_grad():
            for w in routers:
                w.add_(torch.randn(w.shape, generator=g) * self.noise)
        try:
            return super()._generate_single_turn(*args, **kwargs)
        finally:
            with torch.no_grad():
                for w, v in zip(routers, saved):
                    w.copy_(v)


def reward(completions, **kwargs):
    """Toy reward: vowels, minus a small length cost."""
    return [sum(c.count(v) for v in "aeiou") - 0.1 * len(c) for c in completions]


def run(replay: bool, steps: int, noise: float, sharpen: float) -> list[dict]:
    model, tok = load_builtin("tiny-qwen3-moe")
    with torch.no_grad():  # a random model predicts ~uniformly; sharpen it like a trained one
        model.lm_head.weight.mul_(sharpen)
    model.train()
    MismatchedRollout.noise = noise
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(output_dir=out, per_device_train_batch_size=8, num_generations=4,
                          max_completion_length=12, max_steps=steps, logging_strategy="no",
                          report_to=[], use_cpu=True, learning_rate=1e-3, save_strategy="no",
                          seed=0, disable_tqdm=True, log_level="error")
        trainer = MismatchedRollout(model=model, reward_funcs=reward, args=args,
                                    train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}),
                                    processing_class=tok, r3_replay=replay, r3_diagnostics=True)
        trainer.train()
    return trainer.r3_history


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--noise", type=float, default=0.01,
                   help="std of the rollout's router weight perturbation (the weights' is 0.125)")
    p.add_argument("--sharpen", type=float, default=30.0,
                   help="lm_head scale, so that token log-probs depend on the routes")
    a = p.parse_args()
    t0 = time.perf_counter()
    hist = {r: run(r, a.steps, a.noise, a.sharpen) for r in (False, True)}
    print(f"\nGRPO on builtin:tiny-qwen3-moe, {a.steps} steps, rollout router noise {a.noise}, "
          f"lm_head x{a.sharpen:g}")
    print(f"{'step':>4} {'replay':>6} {'cells':>6} {'route differ':>13} {'k3 KL':>10} "
          f"{'ratio>2':>8} {'fallback':>9}")
    for r in (False, True):
        for rec in hist[r]:
            fb = rec["fallback_cells"] / max(1, rec["replayed_cells"] + rec["fallback_cells"])
            print(f"{rec['step']:>4} {'on' if r else 'off':>6} {rec['cells']:>6} "
                  f"{100 * rec['route_differ_fraction']:>12.2f}% {rec['k3_kl']:>10.2e} "
                  f"{100 * rec['extreme_fraction']:>7.2f}% {100 * fb if r else 0:>8.1f}%")
    for r in (False, True):
        h = hist[r]
        print(f"mean over steps, replay {'on ' if r else 'off'}: route differ "
              f"{100 * sum(x['route_differ_fraction'] for x in h) / len(h):.2f}%, k3 KL "
              f"{sum(x['k3_kl'] for x in h) / len(h):.2e}")
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
