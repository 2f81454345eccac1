"""The on-device detector: what in a message is private, found offline with numpy alone.

Two parts, both shipped with the SDK:
- structured identifiers by precompiled patterns with their checks: EMAIL, PHONE, CARD (Luhn), IBAN (mod-97),
  ACCOUNT (long digit runs), DATE_OF_BIRTH (a date near "born", "DOB", "birthday") and other DATEs, SSN (US),
  NI_NUMBER (UK), and street addresses as LOCATION;
- names, PERSON, LOCATION and ORGANIZATION, by a small token classifier: hashed features of each word (its
  form, shape, affixes, character trigrams, gazetteers of names and places, how often it is written in lower
  case) and of its neighbours, summed into a 32-dimensional vector, one hidden layer, four outputs. Its weights
  (`client_sdk/data/detector.*`, safetensors + JSON) were trained by `python -m bench.detect train` on text
  synthesized with Faker in many locales and on four Austen novels with hand-built lists of their people and
  places; `veil bench detect` measures it (bench/results/detect.md), including what it misses.

Detection only proposes: the app decides (`client.generate(prompt, private="detect")`), and without it the whole
message stays private (the SDK's default).

    detect("Mail Ann Smith at ann@example.com")  # [Detection(5, 14, 'PERSON'), Detection(18, 33, 'EMAIL')]
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping

import numpy as np
from safetensors.numpy import load_file

from client_sdk.spans import Message, Part, Treatment

WEIGHTS = Path(__file__).resolve().parent / "data" / "detector"
NAME_LABELS = ("PERSON", "LOCATION", "ORGANIZATION")
STRUCTURED_LABELS = ("EMAIL", "PHONE", "CARD", "IBAN", "ACCOUNT", "DATE_OF_BIRTH", "DATE", "SSN", "NI_NUMBER")
LABELS = NAME_LABELS + STRUCTURED_LABELS

_MONTH = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sep(?:t(?:ember)?)?|"
          r"Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)")
_STREET = (r"(?:Street|St|Road|Rd|Avenue|Ave|Lane|Ln|Drive|Dr|Boulevard|Blvd|Court|Ct|Place|Pl|Square|Sq|Way|"
           r"Terrace|Close|Crescent|Gardens|Park|Parkway|Hill|Row|Walk|Mews|Grove)")
# In priority order: where two overlap and are as long, the earlier wins.
PATTERNS: dict[str, re.Pattern[str]] = {
    "EMAIL": re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b"),
    "IBAN": re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b"),
    "CARD": re.compile(r"\b\d(?:[ -]?\d){11,18}\b"),
    "SSN": re.compile(r"\b(?!000|666|9\d\d)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}\b"),
    "NI_NUMBER": re.compile(r"\b(?!BG|GB|KN|NK|NT|TN)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b"),
    "DATE": re.compile(rf"\b(?:\d{{1,2}}[/.-]\d{{1,2}}[/.-](?:\d{{4}}|\d{{2}})|\d{{4}}[-/.]\d{{1,2}}[-/.]\d{{1,2}}|"
                       rf"\d{{1,2}}(?:st|nd|rd|th)?(?: of)? {_MONTH}\.?,? \d{{4}}|"
                       rf"{_MONTH}\.? \d{{1,2}}(?:st|nd|rd|th)?,? \d{{4}})\b"),
    "PHONE": re.compile(r"(?<![\w+])(?:\+\d{7,15}|(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,5}\)[ .-]?)?\d{1,8}(?:[ .-]\d{1,8}){0,6})"
                        r"(?:\s?(?:x|ext\.?)\s?\d{1,5})?\b"),
    "ACCOUNT": re.compile(r"\b\d{8,17}\b|\b\d{2}-\d{2}-\d{2}\b"),
    "LOCATION": re.compile(rf"\b\d{{1,5}}[A-Za-z]? (?:[A-Z][\w'-]* ){{1,3}}{_STREET}\b\.?"),
}
_PRIORITY = {label: i for i, label in enumerate(PATTERNS)} | {"DATE_OF_BIRTH": list(PATTERNS).index("DATE")}
_BIRTH = re.compile(r"(?i)\b(?:born|birth|birthday|d\.?o\.?b\.?|bday)\b")
_PHONE_CONTEXT = re.compile(r"(?i)\b(?:call|phone|tel|telephone|mobile|cell|fax|ring|text|whatsapp|number|no)\b")
_SORT_CODE_CONTEXT = re.compile(r"(?i)\bsort ?code\b")


@dataclass(frozen=True)
class Detection:
    """A proposed private span: text[start:end] of kind `label`."""

    start: int
    end: int
    label: str


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def iban_valid(iban: str) -> bool:
    """The ISO 13616 check: the rearranged IBAN, letters as numbers, is 1 modulo 97."""
    compact = iban.replace(" ", "")
    return 15 <= len(compact) <= 34 and int("".join(str(int(c, 36)) for c in compact[4:] + compact[:4])) % 97 == 1


def _accepted(label: str, text: str, match: re.Match[str]) -> str | None:
    """The match's label after its checks (None: rejected)."""
    found = match.group(0)
    digits = re.sub(r"\D", "", found)
    before = text[max(0, match.start() - 60) : match.start()]
    if label == "CARD":
        return label if luhn_valid(digits) else None
    if label == "IBAN":
        return label if iban_valid(found) else None
    if label == "DATE":
        return "DATE_OF_BIRTH" if _BIRTH.search(before) else label
    if label == "PHONE":
        # 7 to 15 digits that look like a phone number: separated groups with an international or trunk prefix,
        # an area code in brackets or ten digits or more, or any digits after a word such as "call" (not a year,
        # a count or a price)
        if not 7 <= len(digits) <= 15:
            return None
        if _PHONE_CONTEXT.search(before[-40:]):
            return label
        return label if not found.isdigit() and (found[0] in "+(0" or len(digits) >= 10) else None
    if label == "ACCOUNT" and "-" in found:
        return label if _SORT_CODE_CONTEXT.search(before) else None
    return label


def _pattern_detections(text: str) -> list[Detection]:
    found = []
    for label, pattern in PATTERNS.items():
        for match in pattern.finditer(text):
            accepted = _accepted(label, text, match)
            if accepted:
                end = match.end() - (1 if label == "LOCATION" and match.group(0).endswith(".") else 0)
                found.append(Detection(match.start(), end, accepted))
    return found


# -- the name classifier ---------------------------------------------------------------------------------------

TOKEN = re.compile(r"\w+(?:[-'’.](?![sS]\b)\w+)*|[^\w\s]")
"""A word (letters, digits, inner hyphens, apostrophes and dots; a possessive 's is its own token) or a symbol."""
_SENTENCE_END = frozenset('.!?"“”:;\n')
_TITLES = frozenset("mr mrs ms miss dr sir lady lord madam madame rev prof professor colonel captain general "
                    "admiral mister uncle aunt king queen prince princess saint st count baron judge".split())
CONTEXT_OFFSETS = (-2, -1, 1, 2)
_CALENDAR = frozenset("monday tuesday wednesday thursday friday saturday sunday january february march april may june "
                      "july august september october november december".split())
"""Never a name on their own (a month is not a person), whatever the classifier says: June Smith is found as Smith."""


def _shape(word: str) -> str:
    """The word's letters as X (upper case) and x, digits as d, runs collapsed: "McDonald's" -> "XxXx'x"."""
    shape = "".join("X" if c.isupper() else "x" if c.isalpha() else "d" if c.isdigit() else c for c in word)
    return re.sub(r"(.)\1+", r"\1", shape)


def _not_a_name(words: list[str], t: int) -> bool:
    """Punctuation, the s of a possessive 's, weekdays and months are never part of a name."""
    return not words[t][0].isalnum() or words[t] in ("s", "S") and t > 0 and words[t - 1] in ("'", "’") or \
        words[t].lower() in _CALENDAR


class NameModel:
    """The trained token classifier (weights and vocabularies from `WEIGHTS`); `name_scores` scores a text."""

    def __init__(self, tensors: Mapping[str, np.ndarray], config: dict) -> None:
        self.config = config
        self.labels: list[str] = config["labels"]
        self.buckets: int = config["buckets"]
        self.embedding = tensors["embedding"].astype(np.float32)
        self.hidden_w, self.hidden_b = tensors["hidden.weight"], tensors["hidden.bias"]
        self.out_w, self.out_b = tensors["out.weight"], tensors["out.bias"]
        self.bias = np.zeros(len(self.labels), dtype=np.float32)
        self.bias[1:] = config.get("name_bias", 0.0)  # tuned on the training novels: > 0 favours recall
        self.gazetteers: dict[str, frozenset[str]] = {k: frozenset(v) for k, v in config["gazetteers"].items()}
        self.casing: dict[str, int] = config["casing"]
        self._cache: dict[str, tuple[np.ndarray, ...]] = {}
        self._dynamic = {name: self.feature_id(name) for name in
                         ("start", "first", "after_title", "seen_mid", "not_seen_mid", "alone_cap", "bos", "eos")}

    @classmethod
    def load(cls, path: Path = WEIGHTS) -> "NameModel":
        return cls(load_file(str(path.with_suffix(".safetensors"))), json.loads(path.with_suffix(".json").read_text()))

    def feature_id(self, feature: str) -> int:
        return zlib.crc32(feature.encode()) % self.buckets

    def word_features(self, word: str) -> tuple[list[str], list[str]]:
        """The features of a word on its own (they do not depend on the text around it): those of its letters
        (form, affixes, character trigrams), then those of its kind (shape, case, gazetteers, length)."""
        lower = word.lower()
        padded = f"<{lower}>"
        lexical = [f"w={lower}", f"s3={lower[-3:]}", f"s2={lower[-2:]}", f"p2={lower[:2]}", f"s4={lower[-4:]}",
                   f"p3={lower[:3]}", *[f"c3={padded[i:i + 3]}" for i in range(len(padded) - 2)][:12]]
        kind = [f"shape={_shape(word)}", f"len={min(len(word), 12)}", f"case={self.casing.get(lower, 'unseen')}"]
        if word[:1].isupper():
            kind.append("cap")
            kind.append("allcap" if word.isupper() and len(word) > 1 else "titlecase")
        kind += [f"gz={name}" for name, words in self.gazetteers.items() if lower in words]
        if lower in _TITLES:
            kind.append("title")
        return lexical, kind

    def _word_ids(self, word: str) -> tuple[np.ndarray, ...]:
        """Hashed ids of a word's own features (its letters' first) and of those it lends its neighbours at each
        context offset."""
        cached = self._cache.get(word)
        if cached is None:
            lexical, kind = self.word_features(word)
            shared = [lexical[0], *kind]
            cached = (np.array([self.feature_id(f) for f in lexical + kind], dtype=np.int64),
                      *(np.array([self.feature_id(f"{o}:{f}") for f in shared], dtype=np.int64) for o in CONTEXT_OFFSETS))
            if len(self._cache) < 200_000:
                self._cache[word] = cached
        return cached

    def lexical_count(self, word: str) -> int:
        """How many of the word's first feature ids are of its letters (training hides them at random)."""
        return len(self.word_features(word)[0])

    def token_ids(self, words: list[str], starts: list[bool]) -> tuple[np.ndarray, np.ndarray]:
        """All feature ids of every token, concatenated, and where each token's ids begin."""
        mid_capitalized = {w for w, s in zip(words, starts) if not s and w[:1].isupper()}
        per_word = [self._word_ids(w) for w in words]
        pieces, offsets, n = [], [], 0
        for t, word in enumerate(words):
            ids = [per_word[t][0]]
            for slot, o in enumerate(CONTEXT_OFFSETS, start=1):
                j = t + o
                if 0 <= j < len(words):
                    ids.append(per_word[j][slot])
            dynamic = []
            if starts[t]:
                dynamic.append(self._dynamic["start"])
            if t == 0:
                dynamic.append(self._dynamic["bos"])
            if t == len(words) - 1:
                dynamic.append(self._dynamic["eos"])
            if t > 0 and words[t - 1].lower() in _TITLES or t > 1 and words[t - 1] == "." and \
                    words[t - 2].lower() in _TITLES:
                dynamic.append(self._dynamic["after_title"])
            if word[:1].isupper():
                dynamic.append(self._dynamic["seen_mid" if word in mid_capitalized else "not_seen_mid"])
            ids.append(np.array(dynamic, dtype=np.int64))
            offsets.append(n)
            for a in ids:
                n += len(a)
            pieces.extend(ids)
        return np.concatenate(pieces), np.array(offsets, dtype=np.int64)

    def logits(self, ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        summed = np.add.reduceat(self.embedding[ids], offsets, axis=0)
        hidden = np.maximum(summed @ self.hidden_w + self.hidden_b, 0.0)
        return hidden @ self.out_w + self.out_b + self.bias

    def name_scores(self, words: list[str], starts: list[bool]) -> tuple[np.ndarray, np.ndarray]:
        """For each word: whether it is part of a name (its most likely class is not O), and its probabilities of
        each name label (PERSON, LOCATION, ORGANIZATION)."""
        if not words:
            return np.zeros(0, dtype=bool), np.zeros((0, len(self.labels) - 1))
        logits = self.logits(*self.token_ids(words, starts))
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        return probs.argmax(axis=1) > 0, probs[:, 1:]


def tokenize(text: str) -> tuple[list[str], list[tuple[int, int]], list[bool]]:
    """The text's tokens, their character spans, and whether each begins a sentence (or a line)."""
    words, spans, starts = [], [], []
    previous_end = 0
    for match in TOKEN.finditer(text):
        word = match.group(0)
        if not words or "\n" in text[previous_end : match.start()]:
            start = True
        else:
            previous = words[-1]
            abbreviation = previous == "." and len(words) > 1 and (words[-2].lower() in _TITLES or len(words[-2]) == 1)
            start = previous[-1] in _SENTENCE_END and not abbreviation
        starts.append(start)
        words.append(word)
        spans.append(match.span())
        previous_end = match.end()
    return words, spans, starts


@lru_cache(maxsize=1)
def name_model() -> NameModel | None:
    """The shipped classifier (None when its weights are absent, e.g. before the first training)."""
    if not WEIGHTS.with_suffix(".safetensors").exists():
        return None
    return NameModel.load()


def _name_detections(text: str, model: NameModel) -> list[Detection]:
    """Runs of name words, one label per run. A word written the same way is treated the same everywhere in the
    text: if any capitalised occurrence is a name, all are, with the label of their probabilities together (a
    name the classifier sees in one sentence is found in all); a run's label is that of its words' together."""
    words, spans, starts = tokenize(text)
    is_name, probs = model.name_scores(words, starts)
    occurrences: dict[str, list[int]] = {}
    for t, word in enumerate(words):
        if word[:1].isupper():
            occurrences.setdefault(word, []).append(t)
    for ts in occurrences.values():
        named = [t for t in ts if is_name[t]]
        if named:
            is_name[ts] = True
            probs[ts] = probs[named].mean(axis=0)
    found: list[tuple[int, int, np.ndarray]] = []
    for t, (start, end) in enumerate(spans):
        if not is_name[t] or _not_a_name(words, t):
            continue
        if found and not text[found[-1][1] : start].strip(" -'’"):
            found[-1] = (found[-1][0], end, found[-1][2] + probs[t])
        else:
            found.append((start, end, probs[t].copy()))
    return [Detection(start, end, NAME_LABELS[int(p.argmax())]) for start, end, p in found]


def detect(text: str) -> list[Detection]:
    """Proposed private spans, non-overlapping, in order: where two overlap the longer wins, and a structured
    identifier wins over a name as long."""
    model = name_model()
    names = _name_detections(text, model) if model is not None else []
    candidates = sorted(_pattern_detections(text) + names,
                        key=lambda d: (d.start, -(d.end - d.start), _PRIORITY.get(d.label, len(_PRIORITY))))
    chosen: list[Detection] = []
    for d in candidates:
        if chosen and d.start < chosen[-1].end:
            if d.end - d.start > chosen[-1].end - chosen[-1].start:
                chosen[-1] = d
            continue
        chosen.append(d)
    return chosen


def detect_parts(text: str, treatment: Treatment | Mapping[str, Treatment] = "placeholder") -> list[Part]:
    """The text as parts: each detected span private with its label (one treatment, or one per label, for all
    labels missing from the map: "placeholder"), the rest public."""
    parts, last = [], 0
    for d in detect(text):
        if d.start > last:
            parts.append(Part(text[last : d.start], "public"))
        chosen = treatment if isinstance(treatment, str) else treatment.get(d.label, "placeholder")
        parts.append(Part(text[d.start : d.end], chosen, d.label))
        last = d.end
    if last < len(text):
        parts.append(Part(text[last:], "public"))
    return parts


def detect_messages(messages: list[Message], treatments: Mapping[str, Treatment]) -> list[Message]:
    """Each private message given as a string, as parts: what `detect` finds private, the rest public. Public
    messages and messages with parts (the app said what is private) stay as they are."""
    return [Message(m.role, detect_parts(m.content, treatments)) if isinstance(m.content, str) and not m.public else m
            for m in messages]
