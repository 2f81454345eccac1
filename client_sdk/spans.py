"""What is private: messages, parts of messages, and the public/private token spans they become.

The default is safe: a message's content (a string) is private throughout, noised by the DEL mechanism.
The chat template's own text (role markers, the generation prompt, a default system prompt the template
adds) is public: the server knows it. A message marked `public=True` is sent in the clear.

Selective privacy inside a message: give its content as parts, `Part(text, treatment)` or `(text, private)`
tuples, or write inline markup and call `markup()`: `[[Alice]]` is noised, `[[Alice|PERSON]]` becomes the
public placeholder `[PERSON_1]`. Treatments:
- "noise": DEL levels on the wire, charged per token.
- "placeholder": the device replaces the text by a typed public placeholder; the real text never leaves,
  and the device restores it in the answer (`Placeholders.restore`, or `StreamRestorer` across chunks).
- "public": sent in the clear, never charged.

Tokenization across span boundaries: each span is tokenized on its own, so private text never shares a
token with public text (a merged token would either leak private bytes in the clear or noise public ones).
A public span's trailing whitespace moves into the private span after it (" France" is one token, as the
model's tokenizer would have made it); the price is that a boundary may tokenize slightly differently from
the whole string.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence, Union

import numpy as np
from tokenizers import Tokenizer

from client_sdk.errors import BundleError

Treatment = Literal["noise", "placeholder", "public"]
LABEL = re.compile(r"[A-Z][A-Z0-9_]*")
MARKUP = re.compile(r"\[\[(.+?)(?:\|([A-Z][A-Z0-9_]*))?\]\]", re.DOTALL)


@dataclass(frozen=True)
class Part:
    """A piece of a message and how it is treated; `label` names a placeholder's type (e.g. "PERSON")."""

    text: str
    treatment: Treatment = "noise"
    label: str = "PRIVATE"

    def __post_init__(self) -> None:
        if self.treatment not in ("noise", "placeholder", "public"):
            raise ValueError(f"unknown treatment {self.treatment!r}; use 'noise', 'placeholder' or 'public'")
        if not LABEL.fullmatch(self.label):
            raise ValueError(f"placeholder label must match {LABEL.pattern}, got {self.label!r}")


Content = Union[str, Sequence[Union[Part, tuple[str, bool]]]]


@dataclass(frozen=True)
class Message:
    """One chat message. A string content is private unless `public`; parts say what is private themselves."""

    role: str
    content: Content
    public: bool = False

    def parts(self) -> list[Part]:
        if isinstance(self.content, str):
            return [Part(self.content, "public" if self.public else "noise")]
        if self.public:
            raise ValueError("a message with parts says what is private itself; do not also mark it public")
        parts = []
        for part in self.content:
            if isinstance(part, Part):
                parts.append(part)
            elif isinstance(part, tuple) and len(part) == 2 and isinstance(part[0], str):
                parts.append(Part(part[0], "noise" if part[1] else "public"))
            else:
                raise TypeError(f"a part is a Part or a (text, private) tuple, got {part!r}")
        return parts


def markup(text: str) -> list[Part]:
    """Parts from inline markup: `[[text]]` is noised, `[[text|LABEL]]` becomes a placeholder, the rest is public."""
    parts, last = [], 0
    for match in MARKUP.finditer(text):
        if match.start() > last:
            parts.append(Part(text[last : match.start()], "public"))
        label = match.group(2)
        parts.append(Part(match.group(1), "placeholder", label) if label else Part(match.group(1), "noise"))
        last = match.end()
    if last < len(text):
        parts.append(Part(text[last:], "public"))
    return parts


def as_messages(prompt: str | Sequence[Message | Mapping]) -> list[Message]:
    """A prompt string is one private user message; dicts {role, content, public?} become Messages."""
    if isinstance(prompt, str):
        return [Message("user", prompt)]
    messages = [m if isinstance(m, Message) else Message(m["role"], m["content"], bool(m.get("public", False)))
                for m in prompt]
    if not messages:
        raise ValueError("no messages")
    return messages


class Placeholders:
    """The device-side map from public placeholders to the text they stand for, for one prompt."""

    def __init__(self) -> None:
        self._by_text: dict[tuple[str, str], str] = {}
        self.originals: dict[str, str] = {}
        self._counts: dict[str, int] = {}

    def public_text(self, part: Part) -> str:
        """`[LABEL_n]` for this text (the same text gets the same placeholder)."""
        key = (part.label, part.text)
        if key not in self._by_text:
            self._counts[part.label] = self._counts.get(part.label, 0) + 1
            name = f"[{part.label}_{self._counts[part.label]}]"
            self._by_text[key] = name
            self.originals[name] = part.text
        return self._by_text[key]

    @property
    def forms(self) -> dict[str, str]:
        """Every way the answer may repeat a placeholder, `[PERSON_1]` or bare `PERSON_1`, and its original text."""
        return {**{name[1:-1]: text for name, text in self.originals.items()}, **self.originals}

    def restore(self, text: str) -> str:
        """Put the original text back wherever the answer repeats a placeholder (with or without its brackets)."""
        if not self.originals:
            return text
        forms = self.forms
        pattern = "|".join(re.escape(f) if f.startswith("[") else rf"\b{re.escape(f)}\b"
                           for f in sorted(forms, key=len, reverse=True))
        return re.sub(pattern, lambda m: forms[m.group(0)], text)

    def stream_restorer(self) -> "StreamRestorer":
        return StreamRestorer(self)


class StreamRestorer:
    """Restores placeholders in a streamed answer, holding back a chunk's tail that may begin a placeholder."""

    def __init__(self, placeholders: Placeholders) -> None:
        self._placeholders = placeholders
        self._held = self._context = ""

    def feed(self, chunk: str) -> str:
        text = self._held + chunk
        names = self._placeholders.forms
        hold = len(text)
        longest = max((len(n) for n in names), default=0)
        for i in range(max(0, len(text) - longest + 1), len(text)):
            if any(n.startswith(text[i:]) for n in names):
                hold = i
                break
        return self._emit(text[:hold], text[hold:])

    def flush(self) -> str:
        return self._emit(self._held, "")

    def _emit(self, ready: str, held: str) -> str:
        # the last character already emitted is the left context of a bare `PERSON_1` (a word boundary or not)
        context = self._context
        self._held, self._context = held, (context + ready)[-1:]
        return self._placeholders.restore(context + ready)[len(context) :]


@dataclass(frozen=True)
class TokenSpan:
    """Consecutive token ids, all private (sent as mechanism levels) or all public (sent in the clear)."""

    private: bool
    ids: np.ndarray


_MARKER = "\ue000{}\ue001"  # private-use code points: a message's place in the rendered template


def _text_pieces(messages: list[Message], template, bos: str, eos: str,
                 placeholders: Placeholders) -> list[tuple[str, bool]]:
    """(text, private) pieces of the whole prompt, in order, after the chat template (when given)."""
    def pieces_of(message: Message) -> list[tuple[str, bool]]:
        out = []
        for part in message.parts():
            if part.treatment == "placeholder":
                out.append((placeholders.public_text(part), False))
            else:
                out.append((part.text, part.treatment == "noise"))
        return out

    if template is None:
        return [piece for m in messages for piece in pieces_of(m)]
    rendered = template.render(messages=[{"role": m.role, "content": _MARKER.format(i)} for i, m in enumerate(messages)],
                               add_generation_prompt=True, bos_token=bos, eos_token=eos)
    pieces, rest = [], rendered
    for i, message in enumerate(messages):
        before, found, rest = rest.partition(_MARKER.format(i))
        if not found or _MARKER.format(i) in rest:
            raise BundleError("the chat template does not place each message's content once, in order; "
                              "it cannot be split into public and private spans")
        pieces.append((before, False))
        pieces.extend(pieces_of(message))
    pieces.append((rest, False))
    return pieces


def _merge(pieces: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Join neighbours of the same privacy and move whitespace before a private piece into it."""
    merged: list[tuple[str, bool]] = []
    for text, private in pieces:
        if not text:
            continue
        if merged and merged[-1][1] == private:
            merged[-1] = (merged[-1][0] + text, private)
        else:
            merged.append((text, private))
    for i in range(len(merged) - 1):
        (left, left_private), (right, right_private) = merged[i], merged[i + 1]
        if not left_private and right_private:
            stripped = left.rstrip(" ")
            if stripped:
                merged[i], merged[i + 1] = (stripped, False), (left[len(stripped) :] + right, True)
    return merged


def token_spans(tokenizer: Tokenizer, messages: list[Message], *, template=None, bos: str = "", eos: str = "",
                placeholders: Placeholders | None = None) -> list[TokenSpan]:
    """Tokenize a prompt span by span; without a template, the tokenizer's own special prefix (e.g. BOS) is public."""
    placeholders = placeholders if placeholders is not None else Placeholders()
    tokenized = [(private, tokenizer.encode(text, add_special_tokens=False).ids)
                 for text, private in _merge(_text_pieces(messages, template, bos, eos, placeholders))]
    if template is None:
        tokenized.insert(0, (False, tokenizer.encode("", add_special_tokens=True).ids))
    spans: list[TokenSpan] = []
    for private, ids in tokenized:
        if not ids:
            continue
        if spans and spans[-1].private == private:
            spans[-1] = TokenSpan(private, np.concatenate([spans[-1].ids, ids]))
        else:
            spans.append(TokenSpan(private, np.asarray(ids, dtype=np.int64)))
    return spans
