"""Where each row of a transformers ``generate`` call stopped: EOS, stop strings, custom criteria.

Shape legend: B batch rows, W prompt width, G generated columns (``sequences`` is ``[B, W + G]``).

A row's trace ends with the token that stopped it. ``generate`` reports no stop: a finished row is
fed the pad token until every row is done. The EOS stop can be read back from the tokens (the first
EOS). A stop by stop strings or custom ``stopping_criteria`` cannot: the padding that follows is
ambiguous when the pad token is the EOS token (tokenizers without a pad token) or when the model
itself generated pad ids. :class:`StopRecorder` therefore records those stops as ``generate``
makes them: it wraps the call's criteria in one criterion that returns exactly what they return and
remembers, per row, the step at which it first said "done".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["StopRecorder", "generated_lengths"]

# criteria that generate builds itself from its settings and that stop every row at once (a
# custom one of the same type replaces generate's own): passed through, never wrapped
_WHOLE_BATCH = ("MaxLengthCriteria", "MaxTimeCriteria")


def generated_lengths(gen_BG: np.ndarray, eos: int | Sequence[int] | None) -> list[int]:
    """Tokens each row generated, up to and including its first EOS (all G without one)."""
    B, G = gen_BG.shape
    if eos is None:
        return [G] * B
    eos_ids = [eos] if isinstance(eos, (int, np.integer)) else [int(e) for e in eos]
    hit_BG = np.isin(gen_BG, eos_ids)
    return [int(np.argmax(hit_BG[b])) + 1 if hit_BG[b].any() else G for b in range(B)]


def _setting(model: nn.Module, kwargs: dict[str, Any], name: str) -> Any:
    """A generation setting as ``generate`` resolves it: the call's keyword, then the call's
    ``generation_config`` where set, then the model's."""
    if name in kwargs:
        return kwargs[name]
    given = kwargs.get("generation_config")
    value = getattr(given, name, None)
    if value is None:
        value = getattr(getattr(model, "generation_config", None), name, None)
    return value


def _eos_ids(eos: Any) -> list[int]:
    if eos is None:
        return []
    if isinstance(eos, torch.Tensor):
        return [int(x) for x in eos.reshape(-1).tolist()]
    if isinstance(eos, (int, np.integer)):
        return [int(eos)]
    return [int(x) for x in eos]


class StopRecorder:
    """Records where ``generate`` stopped each row by a stop string or a custom criterion.

    Use :meth:`install` on the ``generate`` keyword arguments before the call (it rewrites them
    so that the call behaves exactly as asked), then :meth:`lengths` on the returned sequences.
    """

    def __init__(self, criteria: Sequence[Any], prompt_width: int, eos_ids: Sequence[int]) -> None:
        self.criteria = list(criteria)
        self.prompt_width = prompt_width
        self.eos_ids = list(eos_ids)
        #: per row, the generated length at the first "done" (device tensor; None before a call)
        self.stop_B: torch.Tensor | None = None

    @classmethod
    def install(cls, model: nn.Module, kwargs: dict[str, Any], prompt_width: int) -> StopRecorder:
        """Take the call's stop strings and custom criteria into one recording criterion."""
        from transformers import StopStringCriteria, StoppingCriteriaList

        criteria: list[Any] = []
        eos = _eos_ids(_setting(model, kwargs, "eos_token_id"))
        passed = []
        for c in list(kwargs.pop("stopping_criteria", None) or []):
            if type(c).__name__ == "EosTokenCriteria":
                # it replaces generate's own EOS criterion; its stop is read back from the tokens
                eos = _eos_ids(c.eos_token_id)
                passed.append(c)
            elif type(c).__name__ in _WHOLE_BATCH:
                passed.append(c)
            else:
                criteria.append(c)
        stop_strings = _setting(model, kwargs, "stop_strings")
        if stop_strings:
            tokenizer = kwargs.get("tokenizer")
            if tokenizer is None:
                raise ValueError("capture_generate: stop_strings need the model's tokenizer; pass "
                                 "tokenizer=... (as generate itself requires)")
            criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings))
            # generate must not build them a second time
            if "generation_config" in kwargs and "stop_strings" not in kwargs:
                kwargs["generation_config"] = _without_stop_strings(kwargs["generation_config"])
            if "generation_config" not in kwargs or "stop_strings" in kwargs or getattr(
                    getattr(model, "generation_config", None), "stop_strings", None):
                kwargs["stop_strings"] = None  # a keyword overrides every config
        recorder = cls(criteria, prompt_width, eos)
        if criteria:
            passed.append(recorder)
        if passed:
            kwargs["stopping_criteria"] = StoppingCriteriaList(passed)
        return recorder

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        B = input_ids.shape[0]
        done_B = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for c in self.criteria:
            got = c(input_ids, scores, **kwargs)
            done_B = done_B | torch.as_tensor(got, device=input_ids.device).expand(B)
        G = input_ids.shape[1] - self.prompt_width  # generated so far, this step's token included
        if self.stop_B is None or self.stop_B.shape[0] != B:
            self.stop_B = torch.full((B,), torch.iinfo(torch.int64).max, dtype=torch.int64,
                                     device=input_ids.device)
        # NOTE: stays on the device (no sync); read once, after generate returned
        self.stop_B = torch.where(done_B, torch.clamp(self.stop_B, max=G), self.stop_B)
        return done_B

    def lengths(self, sequences: torch.Tensor | np.ndarray) -> list[int]:
        """Tokens each row generated, up to and including what stopped it."""
        seq = sequences.detach().cpu().numpy() if isinstance(sequences, torch.Tensor) else (
            np.asarray(sequences))
        gen_BG = seq[:, self.prompt_width:]
        out = generated_lengths(gen_BG, self.eos_ids)
        if self.stop_B is not None:
            stops = self.stop_B.cpu().numpy()  # NOTE: host copy, after generate
            out = [min(n, int(s)) for n, s in zip(out, stops, strict=True)]
        return out


def _without_stop_strings(gc: Any) -> Any:
    import copy

    gc = copy.deepcopy(gc)
    gc.stop_strings = None
    return gc
