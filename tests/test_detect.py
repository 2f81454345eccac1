"""The optional on-device detector proposes spans for structured identifiers; the app decides."""

import pytest

from client_sdk import detect as detector
from client_sdk.detect import detect, detect_parts, luhn_valid
from client_sdk.spans import Part


@pytest.fixture(params=["presidio", "patterns only"], autouse=True)
def backend(request, monkeypatch) -> None:
    """Both with presidio-analyzer (when installed) and with the built-in patterns alone."""
    if request.param == "presidio":
        pytest.importorskip("presidio_analyzer")
    else:
        monkeypatch.setattr(detector, "_presidio", lambda: None)

TEXT = ("Mail ann.smith@example.com or call +44 20 7946 0958 before 12 March 2025; card 4111 1111 1111 1111, "
        "IBAN GB82 WEST 1234 5698 7654 32, we live at 221 Baker Street.")


def test_structured_identifiers_are_found() -> None:
    found = {(d.label, TEXT[d.start : d.end]) for d in detect(TEXT)}
    assert {("EMAIL", "ann.smith@example.com"), ("DATE", "12 March 2025"), ("CARD", "4111 1111 1111 1111"),
            ("IBAN", "GB82 WEST 1234 5698 7654 32"), ("ADDRESS", "221 Baker Street.")} <= found
    assert any(label == "PHONE" and "7946 0958" in text for label, text in found)


def test_detections_do_not_overlap_and_parts_rebuild_the_text() -> None:
    spans = detect(TEXT)
    assert all(a.end <= b.start for a, b in zip(spans, spans[1:]))
    parts = detect_parts(TEXT, treatment="placeholder")
    assert "".join(p.text for p in parts) == TEXT
    assert Part("ann.smith@example.com", "placeholder", "EMAIL") in parts


def test_a_card_number_must_pass_luhn() -> None:
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert not any(d.label == "CARD" for d in detect("order 4111 1111 1111 1112 shipped"))


def test_plain_prose_proposes_nothing() -> None:
    assert detect("It is a truth universally acknowledged, that a single man must be in want of a wife.") == []
