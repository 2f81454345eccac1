"""Training and evaluation text: named corpora, uploaded files, and fixed-length token segments."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

HELD_OUT_NOVEL = "austen-emma"
"""Held out of all training: every soft prompt is checked on it (floor.py)."""
NOVELS = ("emma", "mansfieldpark", "northangerabbey", "prideprejudice", "sensesensibility")
CORPORA = {
    "wikitext-2-valid": ["wikitext-2/valid.txt"],
    "wikitext-2-test": ["wikitext-2/test.txt"],
    "austen": [f"austen/{name}.txt" for name in NOVELS],
    **{f"austen-{name}": [f"austen/{name}.txt"] for name in NOVELS},
    # WikiText-2 valid and every novel but the held-out one: general prose to train on
    "general": ["wikitext-2/valid.txt",
                *(f"austen/{name}.txt" for name in NOVELS if f"austen-{name}" != HELD_OUT_NOVEL)],
}


class DataError(ValueError):
    """A corpus that does not exist, cannot be read, or is too short to train on."""


def read_corpus(name: str, data_dir: Path) -> str:
    """The text of a named corpus (see CORPORA) under `data_dir`."""
    missing = missing_files(name, data_dir)
    if missing:
        raise DataError(f"corpus {name!r} is not on this machine (missing {', '.join(missing)})")
    return "\n".join((data_dir / p).read_text(encoding="utf-8") for p in CORPORA[name])


def missing_files(name: str, data_dir: Path) -> list[str]:
    """The files of a named corpus that are not under `data_dir` (DataError for an unknown name)."""
    if name not in CORPORA:
        raise DataError(f"unknown corpus {name!r}; known: {', '.join(sorted(CORPORA))}")
    return [str(data_dir / p) for p in CORPORA[name] if not (data_dir / p).exists()]


def parse_upload(data: bytes) -> str:
    """Text from an uploaded file: JSONL with a "text" field per line, or plain UTF-8 text."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"the file is not UTF-8 text: {err}") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and all(line.lstrip().startswith("{") for line in lines):
        pieces = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"JSONL line {number}: {err}") from None
            except RecursionError:
                raise DataError(f"JSONL line {number}: nested too deeply") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f'JSONL line {number}: expected an object with a string "text" field')
            pieces.append(record["text"])
        text = "\n".join(pieces)
    if not text.strip():
        raise DataError("the file has no text")
    return text


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def token_segments(text: str, tokenizer: PreTrainedTokenizerBase, length: int) -> torch.Tensor:
    """Non-overlapping windows of `length` tokens over the whole text: (count x length)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    count = len(ids) // length
    if count == 0:
        raise DataError(f"the text has {len(ids)} tokens, fewer than one segment of {length}")
    return torch.tensor(ids[: count * length]).view(count, length)


def evenly_spaced(segments: torch.Tensor, count: int) -> torch.Tensor:
    """A fixed, deterministic sample of `count` segments spread over the whole corpus."""
    if count >= len(segments):
        return segments
    return segments[torch.linspace(0, len(segments) - 1, count).round().long()]


def split_held_out(segments: torch.Tensor, fraction: float = 0.05, minimum: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out): every 1/fraction-th segment is held out, so both span the whole corpus."""
    if len(segments) < 2:
        raise DataError("need at least two segments to hold one out")
    every = max(2, min(round(1 / fraction), len(segments) // minimum))
    held = torch.zeros(len(segments), dtype=torch.bool)
    held[every - 1 :: every] = True
    return segments[~held], segments[held]
