"""What is private: parts, markup, placeholders restored across any chunking, tokenization span by span."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers

from client_sdk.spans import Message, Part, Placeholders, as_messages, markup, token_spans


def test_markup_marks_noise_and_placeholders_and_leaves_the_rest_public() -> None:
    assert markup("Call [[Ann Smith|PERSON]] at [[555-0100]] today") == [
        Part("Call ", "public"), Part("Ann Smith", "placeholder", "PERSON"), Part(" at ", "public"),
        Part("555-0100", "noise"), Part(" today", "public")]
    assert markup("no markup") == [Part("no markup", "public")]


def test_the_default_is_private_throughout() -> None:
    assert as_messages("a [[b]] c")[0].parts() == [Part("a [[b]] c", "noise")]  # markup only when asked for
    assert Message("system", "be brief", public=True).parts() == [Part("be brief", "public")]
    assert Message("user", [("x", True), ("y", False)]).parts() == [Part("x", "noise"), Part("y", "public")]
    with pytest.raises(ValueError):
        Part("x", "blur")


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(0, 60), max_size=8))
def test_placeholders_are_restored_however_the_answer_is_chunked(cuts: list[int]) -> None:
    placeholders = Placeholders()
    person = placeholders.public_text(Part("Ann", "placeholder", "PERSON"))
    city = placeholders.public_text(Part("Bath", "placeholder", "CITY"))
    assert (person, city) == ("[PERSON_1]", "[CITY_1]")
    assert placeholders.public_text(Part("Ann", "placeholder", "PERSON")) == person  # same text, same name
    answer = f"[{person} met [x] {city} and {person}, PERSON_1: hi XPERSON_1 [PERSON_"
    bounds = sorted({0, len(answer), *[c for c in cuts if c < len(answer)]})
    restorer = placeholders.stream_restorer()
    out = "".join(restorer.feed(answer[a:b]) for a, b in zip(bounds, bounds[1:])) + restorer.flush()
    assert out == placeholders.restore(answer) == "[Ann met [x] Bath and Ann, Ann: hi XPERSON_1 [PERSON_"


def word_tokenizer() -> Tokenizer:
    words = ["<s>", "hi", "ann", "smith", "met", "bob", "?", "Ġann"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<s>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def test_spans_are_tokenized_separately_and_alternate() -> None:
    spans = token_spans(word_tokenizer(), [Message("user", [("hi", False), ("ann smith", True), ("met bob ?", False)])])
    assert [(s.private, s.ids.tolist()) for s in spans] == [(False, [1]), (True, [2, 3]), (False, [4, 5, 6])]
    assert all(isinstance(s.ids, np.ndarray) for s in spans)
