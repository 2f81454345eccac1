"""What the gateway keeps private in an OpenAI conversation: the `--private` modes, as SDK messages.

- whole: every message's text is private (noised), the SDK's default for a string prompt.
- markup: inline markup in any message (`[[text]]` noised, `[[text|LABEL]]` a placeholder, client_sdk.spans.markup);
  the rest, system prompts included, is sent in the clear.
- detect: the on-device detector (client_sdk.detect) proposes spans, which become typed placeholders: the
  identifier never leaves the device, in any form, and the answer gets it back.

An OpenAI client sends the whole conversation each time, and its history holds the answers as the user saw them,
placeholders restored. So the gateway treats one request as one conversation: text that is private anywhere in it
is private everywhere in it (`private_everywhere`), and the same text gets the same placeholder in every message
(the SDK's Placeholders map is per prompt, and a request is one prompt). Without that, the restored name in an
earlier answer would go back to the server in the clear.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

from client_sdk.detect import detect_parts
from client_sdk.spans import Message, Part, markup

Mode = Literal["whole", "markup", "detect"]
MODES: tuple[str, ...] = get_args(Mode)
ROLES = {"developer": "system"}  # the chat template knows system, user and assistant


def parts_of(text: str, mode: Mode) -> list[Part]:
    if mode == "whole":
        return [Part(text, "noise")]
    if mode == "markup":
        return markup(text)
    return detect_parts(text, treatment="placeholder")


def private_everywhere(conversation: list[list[Part]]) -> list[list[Part]]:
    """Public text that repeats a private part's text anywhere in the conversation gets that part's treatment."""
    private = {part.text: part for parts in conversation for part in parts if part.treatment != "public" and part.text}
    if not private:
        return conversation
    pattern = re.compile("|".join(re.escape(text) for text in sorted(private, key=len, reverse=True)))
    out = []
    for parts in conversation:
        split: list[Part] = []
        for part in parts:
            if part.treatment != "public":
                split.append(part)
                continue
            last = 0
            for match in pattern.finditer(part.text):
                split.append(Part(part.text[last : match.start()], "public"))
                split.append(private[match.group(0)])
                last = match.end()
            split.append(Part(part.text[last:], "public"))
        out.append([p for p in split if p.text])
    return out


def to_messages(conversation: list[tuple[str, list[str]]], mode: Mode) -> list[Message]:
    """SDK messages from (role, texts) pairs under `mode`."""
    parts = private_everywhere([[p for text in texts for p in parts_of(text, mode)] for _, texts in conversation])
    return [Message(ROLES.get(role, role), message_parts) for (role, _), message_parts in zip(conversation, parts)]
