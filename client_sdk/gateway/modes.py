"""What the gateway keeps private in an OpenAI conversation: the `--private` modes, as SDK messages.

- whole: every message's text is private (noised), the SDK's default for a string prompt.
- markup: inline markup in any message (`[[text]]` noised, `[[text|LABEL]]` a placeholder, client_sdk.spans.markup);
  the rest, system prompts included, is sent in the clear.
- detect: the on-device detector (client_sdk.detect) proposes spans, which become typed placeholders: the
  identifier never leaves the device, in any form, and the answer gets it back.

An OpenAI client sends the whole conversation each time, its history holding the answers as the user saw them
(placeholders restored). Each conversation gets one SDK `Conversation`, kept across its requests: a value private
anywhere in it (marked, detected, in any turn so far) is private everywhere in it, with the same placeholder, and
answers are restored only from the placeholders it issued. Without that, the restored name in an earlier answer
would go back to the server in the clear. A conversation is identified by its caller's budget key and its opening
(every message up to and including the first user message): OpenAI's API has no conversation id, and `user` names
a person, not a conversation. Two conversations with the same opening share a map, which only makes more private.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Literal, get_args

from client_sdk.detect import detect_parts
from client_sdk.spans import Conversation, Message, Part, markup

Mode = Literal["whole", "markup", "detect"]
MODES: tuple[str, ...] = get_args(Mode)
ROLES = {"developer": "system"}  # the chat template knows system, user and assistant


def parts_of(text: str, mode: Mode) -> list[Part]:
    if mode == "markup":
        return markup(text)
    return detect_parts(text, treatment="placeholder")


def to_messages(conversation: list[tuple[str, list[str]]], mode: Mode) -> list[Message]:
    """SDK messages from (role, texts) pairs under `mode`."""
    if mode == "whole":  # a string content: private throughout, as the SDK treats a string prompt
        return [Message(ROLES.get(role, role), "".join(texts)) for role, texts in conversation]
    return [Message(ROLES.get(role, role), [p for text in texts for p in parts_of(text, mode)])
            for role, texts in conversation]


def opening(conversation: list[tuple[str, list[str]]]) -> str:
    """What identifies a conversation across its requests: a hash of its messages up to the first user message."""
    first_user = next((i for i, (role, _) in enumerate(conversation) if role == "user"), len(conversation) - 1)
    return hashlib.sha256(json.dumps(conversation[: first_user + 1]).encode()).hexdigest()


class Conversations:
    """The SDK `Conversation` of each conversation the gateway has seen, the least recently used forgotten first."""

    def __init__(self, size: int = 1000) -> None:
        self._size = size
        self._known: OrderedDict[tuple[str, str], Conversation] = OrderedDict()

    def get(self, budget_key: str, conversation: list[tuple[str, list[str]]]) -> Conversation:
        key = (budget_key, opening(conversation))
        found = self._known.pop(key, None) or Conversation()
        self._known[key] = found
        if len(self._known) > self._size:
            self._known.popitem(last=False)
        return found
