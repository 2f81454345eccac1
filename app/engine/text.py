"""Text of a growing token sequence, decoded one token at a time, and stop strings found in it as they appear.

Cheap by construction: each token decodes a few tokens (the prefix/read offsets vLLM and TGI use, so that a word's
leading space and multi-byte characters come out right), and each stop string is searched for only in the new text
plus the stop string's length before it. Stop strings are bounded (`check_stop`), so the work per token is too.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 256
MAX_STOP_TOKENS = 32
"""A stop string may be at most this many tokens of the model's tokenizer (and MAX_STOP_CHARS characters)."""


def check_stop(stop: tuple[str, ...], tokenizer: PreTrainedTokenizerBase) -> str | None:
    """Why these stop strings are refused, or None when they are fine."""
    if len(stop) > MAX_STOP_STRINGS:
        return f"at most {MAX_STOP_STRINGS} stop strings"
    for s in stop:
        if not s:
            return "stop strings must not be empty"
        if len(s) > MAX_STOP_CHARS:  # checked before tokenizing, which would cost as much as the string is long
            return f"a stop string may be at most {MAX_STOP_CHARS} characters, got {len(s)}"
        tokens = len(tokenizer(s, add_special_tokens=False).input_ids)
        if tokens > MAX_STOP_TOKENS:
            return f"a stop string may be at most {MAX_STOP_TOKENS} tokens, got {tokens}"
    return None


def truncate_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """Cut `text` at the first occurrence of any stop string."""
    cut = min((i for s in stop if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


class TextStream:
    """The text of generated tokens, pushed one at a time; finds the first stop string and says what text is safe to
    send (none that could still turn out to be the start of a stop string)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.longest_stop = max(map(len, stop), default=0)
        self.ids: list[int] = []
        self.text = ""
        self.stopped_at: int | None = None  # where the first stop string begins, once one has appeared
        self._prefix = self._read = 0  # ids[_prefix:_read] were decoded last time, as context for the next token
        self._sent = 0

    def push(self, token: int) -> bool:
        """Add one generated token; True once a stop string has appeared."""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):  # else: a character still incomplete
            start = max(0, len(self.text) - self.longest_stop + 1)
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
            found = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
            if found:
                self.stopped_at = min(found)
        return self.stopped_at is not None

    @property
    def final_text(self) -> str:
        return truncate_at_stop(self.text, self.stop)

    def take(self, finished: bool) -> str:
        """The text not yet taken that is safe to send: all of it once `finished`, else up to any tail that could
        still grow into a stop string."""
        if self.stopped_at is not None:
            end = self.stopped_at
        else:
            end = len(self.text) - (0 if finished else self._stop_prefix_length())
        piece, self._sent = self.text[self._sent:end], max(self._sent, end)
        return piece

    def _stop_prefix_length(self) -> int:
        """The length of the longest end of the text that is the beginning of a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
