"""What ``routecap capture`` checks before it loads a model: everything that can be checked.

A capture that fails after the model has loaded and a batch has run wastes minutes to hours of
accelerator time, so the model folder (config, weight index, weight file headers), the tokenizer,
every prompt's token ids against the vocabulary and the sampling arguments are checked first, and
the job's fingerprint (what ``--resume`` must match) is computed here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .prompts import Prompt

__all__ = ["JobError", "ModelInfo", "check_model", "check_sampling", "encode_prompts",
           "fingerprint"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                    "spiece.model")
_MAX_ST_HEADER = 100 * 1024 * 1024


class JobError(ValueError):
    """The job cannot run as configured; the message says why and what to do."""


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    name: str
    builtin: bool
    vocab_size: int | None
    has_tokenizer: bool
    files: tuple[tuple[str, int], ...]  # weight files and sizes (for the fingerprint)
    config_sha256: str


def check_sampling(*, sample: bool, temperature: float, top_p: float) -> None:
    if not sample:
        return
    if not temperature > 0:
        raise JobError(f"--sample needs --temperature > 0, got {temperature}; for deterministic "
                       "decoding use --greedy")
    if not top_p > 0:
        raise JobError(f"--sample needs --top-p > 0, got {top_p}")


def check_model(name: str) -> ModelInfo:
    """Check a model reference without loading weights: a built-in name, or a folder whose
    config, weight index and safetensors headers are whole and consistent."""
    from .builtin import BUILTIN_MODELS, BUILTIN_PREFIX, tiny_config

    if name.startswith(BUILTIN_PREFIX):
        key = name.removeprefix(BUILTIN_PREFIX)
        if key not in BUILTIN_MODELS:
            raise JobError(f"--model: unknown built-in model {key!r}; expected one of "
                           f"{sorted(BUILTIN_MODELS)}")
        cfg = tiny_config(key)
        return ModelInfo(name=name, builtin=True, vocab_size=int(cfg.vocab_size),
                         has_tokenizer=True, files=(), config_sha256="")
    path = Path(name)
    if not path.is_dir():
        raise JobError(f"--model {name}: no such folder, and not a built-in model (built-ins: "
                       f"{', '.join(BUILTIN_PREFIX + k for k in sorted(BUILTIN_MODELS))}). "
                       "Models are loaded from local folders only.")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise JobError(f"--model {name}: no config.json in it; expected a transformers model "
                       "folder (as written by save_pretrained)")
    raw = cfg_path.read_bytes()
    try:
        cfg = json.loads(raw)
        if not isinstance(cfg, dict):
            raise ValueError("expected a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise JobError(f"--model {name}: config.json is not a JSON object ({e})") from None
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    vocab = text.get("vocab_size", cfg.get("vocab_size"))
    files = _check_weights(path, name)
    return ModelInfo(name=name, builtin=False,
                     vocab_size=vocab if isinstance(vocab, int) and vocab > 0 else None,
                     has_tokenizer=any((path / f).is_file() for f in _TOKENIZER_FILES),
                     files=files, config_sha256=hashlib.sha256(raw).hexdigest())


def _check_weights(path: Path, name: str) -> tuple[tuple[str, int], ...]:
    for index in sorted(path.glob("*.index.json")):
        try:
            doc = json.loads(index.read_bytes())
            wm = doc["weight_map"]
            if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in wm.items()):
                raise TypeError("weight_map should map tensor names to file names")
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise JobError(f"--model {name}: malformed weight index {index.name} "
                           f"({type(e).__name__}: {e})") from None
        for f in sorted(set(wm.values())):
            if "/" in f or not (path / f).is_file():
                raise JobError(f"--model {name}: {index.name} names weight file {f!r}, which is "
                               "not in the folder")
    weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    if not weights:
        raise JobError(f"--model {name}: no weight files (*.safetensors or *.bin) in it")
    for f in weights:
        if f.suffix == ".safetensors":
            _check_safetensors(f, name)
    return tuple((f.name, f.stat().st_size) for f in weights)


def _check_safetensors(f: Path, name: str) -> None:
    """The header parses and the data it describes is exactly what the file holds."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > _MAX_ST_HEADER or n > size - 8:
            raise JobError(f"--model {name}: weight file {f.name} is truncated or corrupt "
                           f"({size} bytes; its header length field says {n})")
        try:
            header = json.loads(fh.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items()
                       if k != "__metadata__"), default=0)
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError) as e:
            raise JobError(f"--model {name}: weight file {f.name} has a corrupt header "
                           f"({type(e).__name__}: {e})") from None
    if 8 + n + end != size:
        raise JobError(f"--model {name}: weight file {f.name} is truncated or corrupt: its "
                       f"header describes {8 + n + end} bytes, the file has {size}")


def encode_prompts(prompts: Sequence[Prompt], tokenizer: Any, vocab: int | None
                   ) -> list[list[int]]:
    """Every prompt's token ids, checked against the vocabulary (before the model loads)."""
    rows: list[list[int]] = []
    for p in prompts:
        if p.token_ids is not None:
            ids = list(p.token_ids)
        else:
            if tokenizer is None:
                raise JobError(f"request {p.request_id!r}: a text prompt needs a tokenizer and "
                               "the model folder has none; add the tokenizer files, or give token "
                               "ids (--prompts-format ids)")
            ids = list(tokenizer(p.text, add_special_tokens=True)["input_ids"])
            if not ids:
                raise JobError(f"request {p.request_id!r}: the prompt tokenizes to nothing")
        if vocab is not None:
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise JobError(f"request {p.request_id!r}: token id {bad[0]} is outside the "
                               f"model's vocabulary of {vocab}")
        rows.append(ids)
    return rows


def fingerprint(*, model: ModelInfo, prompts: Sequence[Prompt], settings: dict[str, Any]
                ) -> dict[str, Any]:
    """What a resumed capture must share with the run it continues."""
    body = json.dumps([[p.request_id, p.text, list(p.token_ids) if p.token_ids else None]
                       for p in prompts], separators=(",", ":")).encode()
    return {
        "model": model.name,
        "model_config_sha256": model.config_sha256,
        "model_files": [list(f) for f in model.files],
        "prompts_sha256": hashlib.sha256(body).hexdigest(),
        "num_prompts": len(prompts),
        **settings,
    }
