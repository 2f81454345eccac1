"""Stop strings, applied on the device: they are request text, so the gateway never sends them to the server.

The gateway reads the answer as a stream (placeholders already restored), cuts it at the first stop string and
closes the stream, which stops the server's generation at its next token. Like `StreamRestorer`, only a chunk's
tail that may begin a stop string is held back.
"""

from __future__ import annotations


class StopScanner:
    """Cuts a stream of text before the first occurrence of any stop string (which is not emitted)."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = stops
        self._longest = max((len(s) for s in stops), default=0)
        self._held = ""
        self.stopped = False

    def feed(self, chunk: str) -> str:
        """The text that is ready: up to a stop string, or all but a tail that may begin one."""
        text = self._held + chunk
        cuts = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if cuts:
            self.stopped, self._held = True, ""
            return text[: min(cuts)]
        hold = len(text)
        for i in range(max(0, len(text) - self._longest + 1), len(text)):
            if any(s.startswith(text[i:]) for s in self._stops):
                hold = i
                break
        self._held = text[hold:]
        return text[:hold]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held
