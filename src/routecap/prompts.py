"""Prompt files for ``routecap capture``: text lines, JSONL, or token ids.

Formats (``auto`` picks ``jsonl`` for ``.jsonl``/``.json`` files, else ``text``):

* ``text``  one prompt per line; blank lines are skipped.
* ``ids``   one prompt per line as token ids separated by spaces or commas.
* ``jsonl`` one JSON value per line: a string (the prompt), or an object with ``prompt`` or
  ``text`` (a string) or ``input_ids`` / ``token_ids`` (a list of ints), and optionally ``id`` or
  ``request_id``.

Request ids default to the prompt's 0-based number in the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Prompt", "PromptFileError", "read_prompts"]

FORMATS = ("auto", "text", "ids", "jsonl")


class PromptFileError(ValueError):
    """The prompts file is missing or a line cannot be read; the message names the line."""


@dataclass(frozen=True, kw_only=True)
class Prompt:
    request_id: str
    text: str | None = None
    token_ids: tuple[int, ...] | None = None


def _ids(value: object, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise PromptFileError(f"{where}: expected a non-empty list of non-negative token ids, "
                              f"got {str(value)[:80]}")
    return tuple(value)


def read_prompts(path: str | Path, fmt: str = "auto") -> list[Prompt]:
    """Read prompts from ``path``; raises :class:`PromptFileError` naming the file and line."""
    path = Path(path)
    if fmt not in FORMATS:
        raise PromptFileError(f"unknown prompts format {fmt!r}; expected one of {FORMATS}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise PromptFileError(f"prompts file {path} not found") from None
    except IsADirectoryError:
        raise PromptFileError(f"prompts file {path} is a folder, expected a file") from None
    except UnicodeDecodeError as e:
        raise PromptFileError(f"prompts file {path} is not UTF-8 text ({e})") from None
    if fmt == "auto":
        fmt = "jsonl" if path.suffix in (".jsonl", ".json") else "text"
    out: list[Prompt] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        rid = str(len(out))
        if fmt == "text":
            out.append(Prompt(request_id=rid, text=line))
        elif fmt == "ids":
            try:
                ids = [int(v) for v in line.replace(",", " ").split()]
            except ValueError:
                raise PromptFileError(f"{where}: expected token ids (integers), got "
                                      f"{line[:80]!r}") from None
            out.append(Prompt(request_id=rid, token_ids=_ids(ids, where)))
        else:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{where}: not JSON ({e.msg})") from None
            if isinstance(rec, str):
                out.append(Prompt(request_id=rid, text=rec))
                continue
            if not isinstance(rec, dict):
                raise PromptFileError(f"{where}: expected a string or an object, got "
                                      f"{type(rec).__name__}")
            rid = str(rec.get("request_id", rec.get("id", rid)))
            if "input_ids" in rec or "token_ids" in rec:
                ids = rec.get("input_ids", rec.get("token_ids"))
                out.append(Prompt(request_id=rid, token_ids=_ids(ids, where)))
            elif isinstance(rec.get("prompt", rec.get("text")), str):
                out.append(Prompt(request_id=rid, text=rec.get("prompt", rec.get("text"))))
            else:
                raise PromptFileError(f"{where}: expected a 'prompt' or 'text' string or an "
                                      f"'input_ids' list, got keys {sorted(rec)}")
    if not out:
        raise PromptFileError(f"prompts file {path} holds no prompt")
    seen: set[str] = set()
    for p in out:
        if p.request_id in seen:
            raise PromptFileError(f"{path}: request id {p.request_id!r} appears twice")
        seen.add(p.request_id)
    return out
