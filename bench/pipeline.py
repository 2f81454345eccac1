"""What the utility benchmarks share: the evaluated text, its fixed sample, the client's and server's path, scoring.

A corpus is a named one (app.training.data.CORPORA, e.g. `wikitext-2-test`, `austen-emma`) or any UTF-8 text file.
Its sample is evenly spaced 64-token prefix + 64-token continuation segments. The prefix goes through the client's
real path (its int8 projected table, the clip, the stochastic quantizer) and the server's (dequantization, decoder);
the continuation is scored after it.

Private spans: a token is private when it belongs to a capitalised word that does not start a sentence and is not a
title or another always-capitalised common word (`NOT_NAMES`). In Austen these are the characters' and places' names
(Emma, Knightley, Highbury), in WikiText mostly named entities. A heuristic, stated as such in the results.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from app.training.data import CORPORA, DataError, evenly_spaced, read_corpus, text_sha256
from app.training.evaluate import continuation_loss
from client_sdk.mechanism import MechanismParams, dequantize, quantize, secure_rng

PREFIX, CONTINUATION = 64, 64
NOT_NAMES = frozenset("""I Mr Mrs Miss Ms Dr Sir Lady Lord Madam Captain Colonel Major General Saint St The A An
Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April May June July August September
October November December God Christmas English England""".split())
CAPITALISED = re.compile(r"\b[A-Z][a-z]+(?:['\u2019][a-z]+)?\b")
SENTENCE_END = re.compile(r"(^|[.!?;:\"\u201c\u201d(\[=@]|\n)\s*$")
ABBREVIATION = re.compile(r"\b(?:Mr|Mrs|Ms|Dr|St)\.\s*$")


@dataclass(frozen=True)
class Sample:
    """A fixed sample of one corpus: prefixes (B x P ids), continuations (B x C ids), private-span mask (B x P)."""

    corpus: str
    sha256: str
    prefix_ids: torch.Tensor
    continuations: torch.Tensor
    private: np.ndarray


def read_text(corpus: str, data_dir: Path) -> tuple[str, str]:
    """(name, text) of a named corpus or of a UTF-8 text file at the path `corpus`."""
    if corpus in CORPORA:
        return corpus, read_corpus(corpus, data_dir)
    path = Path(corpus)
    if not path.is_file():
        raise DataError(f"{corpus!r} is neither a named corpus ({', '.join(sorted(CORPORA))}) nor a file")
    try:
        return path.stem, path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{corpus} is not UTF-8 text: {err}") from None


def name_characters(text: str) -> np.ndarray:
    """A boolean per character: inside a private span (see the module docstring)."""
    mask = np.zeros(len(text), dtype=bool)
    for match in CAPITALISED.finditer(text):
        word = match.group().split("'")[0].split("\u2019")[0]
        before = text[max(0, match.start() - 40) : match.start()]
        if word not in NOT_NAMES and (ABBREVIATION.search(before) or not SENTENCE_END.search(before)):
            mask[match.start() : match.end()] = True
    return mask


def tokens_with_spans(text: str, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], np.ndarray]:
    """The text's token ids and, per token, whether it overlaps a private span."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    chars = np.concatenate([name_characters(text), [False]])
    inside = np.concatenate([[0], np.cumsum(chars)])
    private = np.array([inside[end] - inside[start] > 0 for start, end in encoded["offset_mapping"]], dtype=bool)
    return encoded["input_ids"], private


def load_sample(tokenizer: PreTrainedTokenizerBase, corpus: str, data_dir: Path, segments: int) -> Sample:
    """The fixed sample of `segments` prefix + continuation segments of a corpus, with its private-span mask."""
    name, text = read_text(corpus, data_dir)
    ids, private = tokens_with_spans(text, tokenizer)
    length = PREFIX + CONTINUATION
    count = len(ids) // length
    if count == 0:
        raise DataError(f"{name} has {len(ids)} tokens, fewer than one segment of {length}")
    windows = torch.tensor(ids[: count * length]).view(count, length)
    picked = evenly_spaced(torch.arange(count), segments)
    sample = windows[picked]
    mask = private[: count * length].reshape(count, length)[picked.numpy(), :PREFIX]
    return Sample(name, text_sha256(text), sample[:, :PREFIX], sample[:, PREFIX:], mask)


def start_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token a text starts from: BOS, or EOS for models without one."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def segment_nlls(model, prefixes: torch.Tensor | list[torch.Tensor], continuations: torch.Tensor,
                 batch: int = 8) -> np.ndarray:
    """Per-segment mean next-token NLL of the continuations after the prefixes (B x P x b embeddings, or a list of
    P_i x b prefixes of different lengths, scored one by one)."""
    with torch.inference_mode():
        if isinstance(prefixes, list):
            losses = [continuation_loss(model, p[None], c[None]) for p, c in zip(prefixes, continuations)]
        else:
            losses = [continuation_loss(model, prefixes[i : i + batch], continuations[i : i + batch])
                      for i in range(0, len(continuations), batch)]
    return torch.cat(losses).double().numpy()


def send(projected: np.ndarray, prefix_ids: torch.Tensor, params: MechanismParams, seed: int) -> np.ndarray:
    """The levels the client sends for these prefixes (B x P x k), from its table as it loads it."""
    return quantize(projected[prefix_ids.numpy()], params, secure_rng(seed))


def reconstruct(projection, levels: np.ndarray, params: MechanismParams) -> torch.Tensor:
    """What the server rebuilds from the levels (B x P x b)."""
    return projection.reconstruct(torch.from_numpy(dequantize(levels, params)))
