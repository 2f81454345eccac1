"""Typed errors raised by the client SDK (and by the wire decoder on the server)."""


class VeilError(Exception):
    """Base class of every error this project raises on purpose."""


class WireFormatError(VeilError, ValueError):
    """A payload is malformed: bad magic or version, bad sizes, or settings that do not match."""


class MechanismError(VeilError, ValueError):
    """Mechanism settings that cannot be used: a mu below the calibrated range, a scale A that float32 cannot carry."""


class ProtocolError(VeilError):
    """The server's answer is not what the API defines (malformed JSON, a broken event stream, missing fields)."""


class BudgetExceededError(VeilError):
    """Sending would spend more privacy than the ledger allows; nothing was sent."""


class BundleError(VeilError):
    """The server's client bundle is unusable: bad hash, missing file, or unknown settings."""


class ServerError(VeilError):
    """The server answered with an error; `status_code` and `detail` say which, `kind` is the server's error
    name (e.g. "overloaded") and `retry_after` the seconds its Retry-After header asked for, when it sent them."""

    def __init__(self, status_code: int, detail: str, kind: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(f"server returned {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail
        self.kind = kind
        self.retry_after = retry_after


class PolicyError(VeilError):
    """The settings asked for (by the server's bundle or the app) are looser than the device's privacy policy."""


class LedgerError(VeilError):
    """The budget ledger cannot be trusted: its file vanished, was replaced, or is corrupt. Nothing was sent."""
