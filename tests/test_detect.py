"""The on-device detector: structured identifiers by pattern and check, names by the shipped classifier."""

import pytest

from client_sdk.detect import (detect, detect_messages, detect_parts, iban_valid, luhn_valid, name_model,
                               tokenize)
from client_sdk.spans import Message, Part

TEXT = ("Mail ann.smith@example.com or call +44 20 7946 0958 before 12 March 2025; card 4111 1111 1111 1111, "
        "IBAN GB82 WEST 1234 5698 7654 32, we live at 221 Baker Street.")


def found(text: str) -> set[tuple[str, str]]:
    return {(d.label, text[d.start : d.end]) for d in detect(text)}


def test_structured_identifiers_are_found() -> None:
    assert {("EMAIL", "ann.smith@example.com"), ("DATE", "12 March 2025"), ("CARD", "4111 1111 1111 1111"),
            ("IBAN", "GB82 WEST 1234 5698 7654 32"), ("LOCATION", "221 Baker Street"),
            ("PHONE", "+44 20 7946 0958")} <= found(TEXT)


def test_national_ids_and_dates_of_birth_are_found() -> None:
    text = "SSN 123-45-6789, NI number AB 12 34 56 C, born on 1990-03-12, DOB: 4 July 1976."
    assert {("SSN", "123-45-6789"), ("NI_NUMBER", "AB 12 34 56 C"), ("DATE_OF_BIRTH", "1990-03-12"),
            ("DATE_OF_BIRTH", "4 July 1976")} <= found(text)
    assert not any(label == "SSN" for label, _ in found("order 000-12-3456 and 666-12-3456"))  # never issued


def test_checksums_reject_lookalikes() -> None:
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert iban_valid("GB82 WEST 1234 5698 7654 32") and not iban_valid("GB83 WEST 1234 5698 7654 32")
    assert not any(label in ("CARD", "IBAN") for label, _ in found("order 4111 1111 1111 1112, GB83WEST12345698765432"))


def test_years_counts_and_prices_are_not_phone_numbers() -> None:
    assert not any(label == "PHONE" for label, _ in found("Between 1914 1918 and 2001 we sold 12 500 copies at 3.50."))
    assert ("PHONE", "020 7946 0958") in found("Call me on 020 7946 0958.")


def test_a_title_does_not_start_a_sentence() -> None:
    assert tokenize("Dear Mr. Weston. Thanks")[2] == [True, False, False, False, False, True]


needs_weights = pytest.mark.skipif(name_model() is None, reason="no detector weights (python -m bench.detect train)")


@needs_weights
def test_names_people_and_places_are_found() -> None:
    text = "Write a birthday greeting for Ann Smith, who lives in Manchester."
    assert {("PERSON", "Ann Smith"), ("LOCATION", "Manchester")} <= found(text)


@needs_weights
def test_plain_prose_proposes_nothing() -> None:
    assert detect("It is a truth universally acknowledged, that a single man must be in want of a wife.") == []
    assert detect("Explain photosynthesis to a ten-year-old in 3 sentences.") == []


def test_detections_do_not_overlap_and_parts_rebuild_the_text() -> None:
    spans = detect(TEXT)
    assert all(a.end <= b.start for a, b in zip(spans, spans[1:]))
    parts = detect_parts(TEXT, treatment={"EMAIL": "noise"})
    assert "".join(p.text for p in parts) == TEXT
    assert Part("ann.smith@example.com", "noise", "EMAIL") in parts
    assert Part("4111 1111 1111 1111", "placeholder", "CARD") in parts  # labels not in the map: placeholders


def test_only_private_string_messages_are_detected() -> None:
    messages = [Message("system", "Mail ann@example.com", public=True), Message("user", "Mail ann@example.com"),
                Message("user", [Part("Mail ann@example.com", "noise")])]
    out = detect_messages(messages, {"EMAIL": "placeholder"})
    assert out[0] == messages[0] and out[2] == messages[2]
    assert out[1].content == [Part("Mail ", "public"), Part("ann@example.com", "placeholder", "EMAIL")]


def test_the_benchmark_counts_mentions_detections_and_other_words() -> None:
    from bench.detect import score
    from bench.detect_data import Labelled
    from client_sdk.detect import Detection

    item = Labelled("Ann met Bob in Rome today", [(0, 3, "PERSON"), (8, 11, "PERSON"), (15, 19, "LOCATION")])
    dets = [Detection(0, 3, "PERSON"), Detection(15, 19, "PERSON"), Detection(20, 25, "LOCATION")]
    s = score([(item, dets)], ("PERSON", "LOCATION"))
    assert (s["PERSON"]["recall"], s["PERSON"]["recall_any_label"], s["PERSON"]["precision"]) == (0.5, 0.5, 0.5)
    assert (s["LOCATION"]["recall"], s["LOCATION"]["recall_any_label"], s["LOCATION"]["precision"]) == (0, 1, 0)
    assert s["other_words_flagged"] == 1 / 3
