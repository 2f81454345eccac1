"""What is private: messages, parts of messages, and the public/private token spans they become.

The default is safe: a message's content (a string) is private throughout, noised by the DEL mechanism.
The chat template's own text (role markers, the generation prompt, a default system prompt the template
adds) is public: the server knows it. A message marked `public=True` is sent in the clear.

Selective privacy inside a message: give its content as parts, `Part(text, treatment)` or `(text, private)`
tuples, or write inline markup and call `markup()`: `[[Alice]]` is noised, `[[Alice|PERSON]]` becomes the
public placeholder `[PERSON_1]`. Treatments:
- "noise": DEL levels on the wire, charged per token.
- "placeholder": the device replaces the text by a typed public placeholder; the real text never leaves,
  and the device restores it in the answer (`Conversation.restore`, or `StreamRestorer` across chunks;
  a `Conversation` carries the placeholders from one prompt to the next).
- "public": sent in the clear, never charged.

Tokenization across span boundaries: each span is tokenized on its own, so private text never shares a
token with public text (a merged token would either leak private bytes in the clear or noise public ones).
A public span's trailing whitespace moves into the private span after it (" France" is one token, as the
model's tokenizer would have made it); the price is that a boundary may tokenize slightly differently from
the whole string.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
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
        if self.treatment == "placeholder" and not self.text.strip():
            # a conversation replaces every occurrence of a placeholder's text: a blank one would match everywhere
            raise ValueError("a placeholder's text must not be empty or only whitespace")


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
    messages = [m if isinstance(m, Message) else Message(m["role"], m["content"], bool(m.get("public")))
                for m in prompt]
    if not messages:
        raise ValueError("no messages")
    return messages


class Conversation:
    """The device's memory of one conversation: the placeholders it issued and the values it noised.

    Pass the same Conversation to every call of one conversation (`client.generate(messages,
    conversation=conversation)`; an OpenAI-style gateway keeps one per conversation). Then:

    - every occurrence of a value marked (or detected) anywhere in the conversation, in any message and whatever
      that message's own marking (a public system prompt, an assistant turn sent back with its values restored),
      gets the value's treatment: the same placeholder, or noise. A value both replaced and noised is replaced.
      Matching is exact and case-sensitive, on word boundaries.
    - an answer is restored only from placeholders this conversation issued: any other `[LABEL_n]` the server
      writes stays as written, a placeholder inside a URL is not restored (a link would carry the value off the
      device), and a placeholder cut off at the end of an answer (`[PERS`) is dropped, never half-restored.

    `originals` maps each issued placeholder (`[PERSON_1]`) to its value; `restore(answer)` and
    `stream_restorer()` put the values back. A new Conversation per prompt (the client's default) forgets.
    """

    def __init__(self) -> None:
        self._by_text: dict[str, str] = {}
        self._labels: dict[str, str] = {}
        self._noised: set[str] = set()
        self.originals: dict[str, str] = {}
        self._counts: dict[str, int] = {}

    def public_text(self, part: Part) -> str:
        """`[LABEL_n]` for this text (the same text always gets the same placeholder)."""
        if part.text not in self._by_text:
            self._counts[part.label] = self._counts.get(part.label, 0) + 1
            name = f"[{part.label}_{self._counts[part.label]}]"
            self._by_text[part.text] = name
            self._labels[part.text] = part.label
            self.originals[name] = part.text
        return self._by_text[part.text]

    def parts(self, messages: Sequence[Message]) -> list[list[Part]]:
        """Each message's parts with every known value given its treatment: first the values the messages mark
        (placeholders issued, noised values remembered), then every occurrence of every value the conversation
        knows, in every part, replaced or noised."""
        marked = [m.parts() for m in messages]
        for message, parts in zip(messages, marked):
            for part in parts:
                if part.treatment == "placeholder":
                    self.public_text(part)
                elif part.treatment == "noise" and not isinstance(message.content, str) and part.text.strip():
                    self._noised.add(part.text)
        pattern = self._values_pattern()
        if pattern is None:
            return marked
        return [[piece for part in parts for piece in self._split(part, pattern)] for parts in marked]

    def _values_pattern(self) -> re.Pattern[str] | None:
        values = sorted(self._by_text.keys() | self._noised, key=len, reverse=True)
        if not values:
            return None
        return re.compile("|".join(_bounded(v) for v in values))

    def _split(self, part: Part, pattern: re.Pattern[str]) -> list[Part]:
        if part.treatment == "placeholder":
            return [part]
        out, last = [], 0
        for match in pattern.finditer(part.text):
            value = match.group(0)
            if value in self._by_text:
                replaced = Part(value, "placeholder", self._labels[value])
            elif part.treatment == "public":
                replaced = Part(value, "noise")
            else:
                continue  # a noised value inside noised text: already noised
            if match.start() > last:
                out.append(replace(part, text=part.text[last : match.start()]))
            out.append(replaced)
            last = match.end()
        if last < len(part.text):
            out.append(replace(part, text=part.text[last:]))
        return out

    @property
    def forms(self) -> dict[str, str]:
        """Every way the answer may repeat a placeholder, `[PERSON_1]` or bare `PERSON_1`, and its original text."""
        return {**{name[1:-1]: text for name, text in self.originals.items()}, **self.originals}

    def restore(self, text: str, *, before: str = "", final: bool = True) -> str:
        """The answer with each issued placeholder's value put back (bracketed or bare), except inside a URL; a
        placeholder cut off at the end of the answer (`final`) is dropped. `before` is the answer's text before
        `text`, as the server wrote it (a streamed chunk's left context): it decides word boundaries and URLs,
        and is not returned."""
        if not self.originals:
            return text
        forms, full = self.forms, before + text
        pattern = "|".join(re.escape(f) if f.startswith("[") else rf"(?<!\[)\b{re.escape(f)}\b(?!\])"
                           for f in sorted(forms, key=len, reverse=True))
        end = max(len(before), len(full) - _cut_placeholder(full, self.originals)) if final else len(full)
        out, last = [], len(before)
        for match in re.compile(pattern).finditer(full, len(before), end):
            if _in_url(_last_word(full[: match.start()])):
                continue
            out += [full[last : match.start()], forms[match.group(0)]]
            last = match.end()
        out.append(full[last:end])
        return "".join(out)

    def stream_restorer(self) -> "StreamRestorer":
        return StreamRestorer(self)


def _last_word(text: str) -> str:
    """The text's last whitespace-delimited word, with the whitespace before it."""
    cut = max(text.rfind(c) for c in " \t\n\r")
    return text[max(cut, 0) :]


def _in_url(word: str) -> bool:
    return "://" in word or "www." in word


def _bounded(value: str) -> str:
    """A regex for `value` as a whole word (no word character glued to either end)."""
    left = r"(?<!\w)" if re.match(r"\w", value) else ""
    right = r"(?!\w)" if re.search(r"\w\Z", value) else ""
    return left + re.escape(value) + right


def _cut_placeholder(text: str, names: Mapping[str, str]) -> int:
    """The length of a proper prefix of an issued `[LABEL_n]` that ends the text (0 if none)."""
    start = text.rfind("[")
    if start < 0:
        return 0
    tail = text[start:]
    return len(tail) if any(n.startswith(tail) and n != tail for n in names) else 0


class StreamRestorer:
    """Restores placeholders in a streamed answer, holding back a chunk's tail that may begin a placeholder."""

    def __init__(self, conversation: Conversation) -> None:
        self._conversation = conversation
        self._held = self._context = ""

    def feed(self, chunk: str) -> str:
        text = self._held + chunk
        names = self._conversation.forms
        hold = len(text)
        longest = max((len(n) for n in names), default=0)
        for i in range(max(0, len(text) - longest + 1), len(text)):
            if any(n.startswith(text[i:]) for n in names):
                hold = i
                break
        return self._emit(text[:hold], text[hold:])

    def flush(self) -> str:
        """The rest of the answer, once it has ended."""
        return self._emit(self._held, "", final=True)

    def _emit(self, ready: str, held: str, final: bool = False) -> str:
        # the answer's last word so far (as the server wrote it) is the left context of the next chunk: it decides
        # a bare `PERSON_1`'s word boundary and whether a placeholder is inside a URL
        context = self._context
        self._held = held
        self._context = _last_word(context + ready)
        return self._conversation.restore(ready, before=context, final=final)


@dataclass(frozen=True)
class TokenSpan:
    """Consecutive token ids, all private (sent as mechanism levels) or all public (sent in the clear)."""

    private: bool
    ids: np.ndarray


_MARKER = "\ue000{}\ue001"  # private-use code points: a message's place in the rendered template


def _text_pieces(messages: list[Message], template, bos: str, eos: str,
                 conversation: Conversation) -> list[tuple[str, bool]]:
    """(text, private) pieces of the whole prompt, in order, after the chat template (when given)."""
    message_parts = conversation.parts(messages)

    def pieces_of(i: int) -> list[tuple[str, bool]]:
        return [(conversation.public_text(part), False) if part.treatment == "placeholder"
                else (part.text, part.treatment == "noise") for part in message_parts[i]]

    if template is None:
        return [piece for i in range(len(messages)) for piece in pieces_of(i)]
    rendered = template.render(messages=[{"role": m.role, "content": _MARKER.format(i)} for i, m in enumerate(messages)],
                               add_generation_prompt=True, bos_token=bos, eos_token=eos)
    pieces, rest = [], rendered
    for i in range(len(messages)):
        before, found, rest = rest.partition(_MARKER.format(i))
        if not found or _MARKER.format(i) in rest:
            raise BundleError("the chat template does not place each message's content once, in order; "
                              "it cannot be split into public and private spans")
        pieces.append((before, False))
        pieces.extend(pieces_of(i))
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
                conversation: Conversation | None = None) -> list[TokenSpan]:
    """Tokenize a prompt span by span; without a template, the tokenizer's own special prefix (e.g. BOS) is public.
    `conversation` (default: a fresh one) issues the placeholders and gives known values their treatment."""
    conversation = conversation if conversation is not None else Conversation()
    tokenized = [(private, tokenizer.encode(text, add_special_tokens=False).ids)
                 for text, private in _merge(_text_pieces(messages, template, bos, eos, conversation))]
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
