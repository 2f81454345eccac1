"""What is private: parts, markup, placeholders restored across any chunking, tokenization span by span."""

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from client_sdk.errors import BundleError
from client_sdk.spans import Conversation, Message, Part, as_messages, markup, token_spans


def test_markup_marks_noise_and_placeholders_and_leaves_the_rest_public() -> None:
    assert markup("Call [[Ann Smith|PERSON]] at [[555-0100]] today") == [
        Part("Call ", "public"), Part("Ann Smith", "placeholder", "PERSON"), Part(" at ", "public"),
        Part("555-0100", "noise"), Part(" today", "public")]
    assert markup("no markup") == [Part("no markup", "public")]


def test_the_default_is_private_throughout() -> None:
    assert as_messages("a [[b]] c")[0].parts() == [Part("a [[b]] c", "noise")]  # markup only when asked for
    assert Message("system", "be brief", public=True).parts() == [Part("be brief", "public")]
    assert Message("user", [("x", True), ("y", False)]).parts() == [Part("x", "noise"), Part("y", "public")]
    with pytest.raises(ValueError, match="unknown treatment 'blur'; use 'noise', 'placeholder' or 'public'"):
        Part("x", "blur")
    with pytest.raises(ValueError, match=re.escape("placeholder label must match [A-Z][A-Z0-9_]*, got 'person'")):
        Part("x", "placeholder", "person")


@pytest.mark.parametrize("text", ["", " \n"])
def test_a_blank_placeholder_is_refused(text: str) -> None:
    # the conversation would replace its text everywhere: between every character of every message
    with pytest.raises(ValueError, match="a placeholder's text must not be empty or only whitespace"):
        Part(text, "placeholder", "PERSON")
    assert Part(text, "public").text == text  # blank text is fine when it is not replaced


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(0, 60), max_size=8))
def test_placeholders_are_restored_however_the_answer_is_chunked(cuts: list[int]) -> None:
    placeholders = Conversation()
    person = placeholders.public_text(Part("Ann", "placeholder", "PERSON"))
    city = placeholders.public_text(Part("Bath", "placeholder", "CITY"))
    assert (person, city) == ("[PERSON_1]", "[CITY_1]")
    assert placeholders.public_text(Part("Ann", "placeholder", "PERSON")) == person  # same text, same name
    answer = (f"[{person} met [x] {city} and {person}, PERSON_1: hi XPERSON_1 [PERSON_2] see "
              f"https://x.example/?q={person}&r=PERSON_1 or www.x.example/{city} then {city} [PERSON_")
    bounds = sorted({0, len(answer), *[c for c in cuts if c < len(answer)]})
    restorer = placeholders.stream_restorer()
    out = "".join(restorer.feed(answer[a:b]) for a, b in zip(bounds, bounds[1:])) + restorer.flush()
    assert out == placeholders.restore(answer) == (
        "[Ann met [x] Bath and Ann, Ann: hi XPERSON_1 [PERSON_2] see "
        "https://x.example/?q=[PERSON_1]&r=PERSON_1 or www.x.example/[CITY_1] then Bath ")


@pytest.mark.parametrize("cut", ["[", "[P", "[PERSON", "[PERSON_1"])
def test_a_placeholder_cut_off_at_the_end_is_dropped_not_half_restored(cut: str) -> None:
    conversation = Conversation()
    conversation.public_text(Part("Ann Smith", "placeholder", "PERSON"))
    assert conversation.restore(f"Dear [PERSON_1], see you, {cut}") == "Dear Ann Smith, see you, "
    restorer = conversation.stream_restorer()
    assert restorer.feed("Dear [PERSON_1], see you, ") + restorer.feed(cut) + restorer.flush() == \
        "Dear Ann Smith, see you, "


def test_a_placeholder_the_conversation_never_issued_is_not_restored() -> None:
    conversation = Conversation()
    conversation.parts([Message("user", markup("Call [[Ann|PERSON]] at [[the office|PLACE]]"))])
    later = Conversation()  # another conversation's placeholders mean nothing here
    assert conversation.restore("[PERSON_1] [PLACE_1] [PERSON_2] [ACCOUNT_1]") == "Ann the office [PERSON_2] [ACCOUNT_1]"
    assert later.restore("[PERSON_1] [PLACE_1]") == "[PERSON_1] [PLACE_1]"


def test_the_longest_known_value_is_replaced_first() -> None:
    """The shorter "Ann" must not claim the start of "Ann Smith": " Smith" would be sent in the clear."""
    conversation = Conversation()
    conversation.parts([Message("user", markup("[[Ann|PERSON]] and [[Ann Smith|PERSON]]"))])
    parts = conversation.parts([Message("system", "Ann Smith called Ann.", public=True)])[0]
    assert parts == [Part("Ann Smith", "placeholder", "PERSON"), Part(" called ", "public"),
                     Part("Ann", "placeholder", "PERSON"), Part(".", "public")]


def test_a_marked_value_gets_its_treatment_everywhere_in_the_conversation() -> None:
    conversation = Conversation()
    messages = [Message("system", "Ann Smith's assistant. Bath is home. Annabel and Bathsheba are not.", public=True),
                Message("user", markup("Email [[Ann Smith|PERSON]] in [[Bath]] about Ann Smith.")),
                Message("user", "Is Ann Smith in Bath?")]
    parts = conversation.parts(messages)
    assert parts[0] == [Part("Ann Smith", "placeholder", "PERSON"), Part("'s assistant. ", "public"),
                        Part("Bath", "noise"), Part(" is home. Annabel and Bathsheba are not.", "public")]
    assert parts[1][-2:] == [Part("Ann Smith", "placeholder", "PERSON"), Part(".", "public")]
    assert parts[2] == [Part("Is ", "noise"), Part("Ann Smith", "placeholder", "PERSON"), Part(" in Bath?", "noise")]


def test_a_restored_answer_sent_back_as_a_public_turn_keeps_its_values_on_the_device() -> None:
    conversation, tokenizer = Conversation(), word_tokenizer()
    first = [Message("user", [Part("hi ", "public"), Part("ann", "placeholder", "PERSON"), Part(" ", "public")])]
    token_spans(tokenizer, first, conversation=conversation)
    answer = conversation.restore("hi [PERSON_1] ")
    assert answer == "hi ann "
    # the next call sends the answer back as a public turn, and the earlier marking is not repeated
    second = [Message("assistant", answer, public=True), Message("user", "met bob ?", public=True)]
    assert tokenizer.token_to_id("ann") in token_spans(tokenizer, second)[0].ids  # without the conversation
    public = [t for s in token_spans(tokenizer, second, conversation=conversation) if not s.private for t in s.ids]
    assert tokenizer.token_to_id("ann") not in public


def word_tokenizer(bos: bool = False) -> Tokenizer:
    """Whole words; with `bos`, encoding with special tokens puts "<s>" (id 0) first, as Llama's tokenizer does."""
    words = ["<s>", "hi", "ann", "smith", "met", "bob", "?", "Ġann"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<s>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tokenizer


def test_spans_are_tokenized_separately_and_alternate() -> None:
    spans = token_spans(word_tokenizer(), [Message("user", [("hi", False), ("ann smith", True), ("met bob ?", False)])])
    assert [(s.private, s.ids.tolist()) for s in spans] == [(False, [1]), (True, [2, 3]), (False, [4, 5, 6])]
    assert all(isinstance(s.ids, np.ndarray) for s in spans)


def test_the_tokenizers_prefix_is_public_once_and_spans_of_one_kind_are_joined() -> None:
    # the private " " tokenizes to nothing, so the public spans around it become one
    messages = [Message("system", "hi", public=True), Message("user", " "), Message("user", "bob", public=True),
                Message("user", "ann")]
    spans = token_spans(word_tokenizer(bos=True), messages)
    assert [(s.private, s.ids.tolist()) for s in spans] == [(False, [0, 1, 5]), (True, [2])]


def test_markup_leaves_no_empty_parts_between_or_around_marked_text() -> None:
    assert markup("[[Ann|PERSON]][[555-0100]]") == [Part("Ann", "placeholder", "PERSON"), Part("555-0100", "noise")]


def test_each_value_of_a_label_gets_its_own_number() -> None:
    conversation = Conversation()
    names = [conversation.public_text(Part(text, "placeholder", label))
             for text, label in [("Ann", "PERSON"), ("Bath", "CITY"), ("Bob", "PERSON")]]
    assert names == ["[PERSON_1]", "[CITY_1]", "[PERSON_2]"]


def test_known_values_are_matched_as_whole_words_and_each_given_its_treatment() -> None:
    conversation = Conversation()
    marked = Message("user", [Part("Bath", "noise"), Part("Ann", "placeholder", "PERSON"),
                              Part("<ann>", "placeholder", "HANDLE")])
    later = [Message("user", "Bath, then Ann"), Message("user", "JoAnn wrote to<ann>cc", public=True)]
    parts = conversation.parts([marked, *later])[1:]
    # a noised value inside noised text stays noised, and the values after it still get their treatment
    assert parts[0] == [Part("Bath, then ", "noise"), Part("Ann", "placeholder", "PERSON")]
    # "Ann" inside "JoAnn" is another word; "<ann>" has no word character at its ends, so no word boundary either
    assert parts[1] == [Part("JoAnn wrote to", "public"), Part("<ann>", "placeholder", "HANDLE"), Part("cc", "public")]


def test_an_answer_that_is_only_a_cut_off_placeholder_is_dropped() -> None:
    conversation = Conversation()
    conversation.public_text(Part("Ann", "placeholder", "PERSON"))
    assert conversation.restore("[PERS") == ""


def test_a_part_is_a_part_or_a_text_and_privacy_pair() -> None:
    with pytest.raises(TypeError):
        Message("user", [("x", True, "extra")]).parts()


def test_a_whole_placeholder_ending_a_chunk_is_restored_at_once() -> None:
    conversation = Conversation()
    conversation.public_text(Part("Ann", "placeholder", "PERSON"))
    restorer = conversation.stream_restorer()
    assert restorer.feed("Dear [PERSON_1]") == "Dear Ann"  # nothing longer could begin there: not held back
    assert restorer.feed(", hi [PERSON_") == ", hi " and restorer.flush() == ""


def test_a_bare_placeholder_opening_an_answer_is_restored_and_nothing_else_is_cut() -> None:
    conversation = Conversation()
    conversation.public_text(Part("Ann", "placeholder", "PERSON"))
    assert conversation.restore("PERSON_1 said hi") == "Ann said hi"


def test_a_placeholder_in_a_url_opening_an_answer_is_not_restored() -> None:
    conversation = Conversation()
    conversation.public_text(Part("Ann", "placeholder", "PERSON"))
    assert conversation.restore("www.Xy.example/[PERSON_1]") == "www.Xy.example/[PERSON_1]"


def byte_level_tokenizer() -> Tokenizer:
    """Whole words with the space before a word in its token ("Ġann"), as byte-level BPE tokenizers have it."""
    words = ["<unk>", "hi", "ann", "Ġann", "Ġ", "Ċ", "BOX"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return tokenizer


@pytest.mark.parametrize("messages, expected", [
    # the space before a private word is sent with it, as one token, at the last boundary of a prompt too
    ([Message("user", [("hi ", False), ("ann", True)])], [(False, ["hi"]), (True, ["Ġann"])]),
    # an empty message is skipped, and what follows it still sent
    ([Message("user", "hi ", public=True), Message("user", ""), Message("user", "ann")],
     [(False, ["hi"]), (True, ["Ġann"])]),
    # only spaces move: a newline stays public, and so does the public text before the spaces, whatever it is
    ([Message("user", [("hi\n", False), ("ann", True)])], [(False, ["hi", "Ċ"]), (True, ["ann"])]),
    ([Message("user", [("BOX ", False), ("ann", True), ("hi", False)])],
     [(False, ["BOX"]), (True, ["Ġann"]), (False, ["hi"])]),
    ([Message("user", [("ann", True), (" ", False)])], [(True, ["ann"]), (False, ["Ġ"])]),  # private keeps its own
])
def test_spaces_before_a_private_span_move_into_it_and_nothing_else_does(messages: list, expected: list) -> None:
    tokenizer = byte_level_tokenizer()
    spans = token_spans(tokenizer, messages)
    assert [(s.private, [tokenizer.id_to_token(i) for i in s.ids]) for s in spans] == expected


TEMPLATE = "{{ bos_token }} {% for m in messages %}{{ m.role }} {{ m.content }} {{ eos_token }} {% endfor %}"


def render_with(template: str):
    return ImmutableSandboxedEnvironment().from_string(template)


def test_the_template_gets_the_bundles_bos_and_eos_text_and_none_by_default() -> None:
    tokenizer, messages = word_tokenizer(), [Message("hi", "ann")]
    spans = token_spans(tokenizer, messages, template=render_with(TEMPLATE), bos="bob", eos="?")
    assert [(s.private, s.ids.tolist()) for s in spans] == [(False, [5, 1]), (True, [2]), (False, [6])]
    spans = token_spans(tokenizer, messages, template=render_with(TEMPLATE))  # "" by default: no unknown words
    assert [(s.private, s.ids.tolist()) for s in spans] == [(False, [1]), (True, [2])]


@pytest.mark.parametrize("template", [
    "{% for m in messages %}{{ m.content }}{{ m.content }}{% endfor %}",  # each content twice
    "{% for m in messages %}{% if loop.first %}{{ m.content }}{% endif %}{% endfor %}",  # one left out
    "{% for m in messages|reverse %}{{ m.content }}{% endfor %}",  # out of order
])
def test_a_template_that_does_not_place_each_message_once_in_order_is_refused(template: str) -> None:
    message = ("the chat template does not place each message's content once, in order; "
               "it cannot be split into public and private spans")
    with pytest.raises(BundleError, match=f"^{re.escape(message)}$"):
        token_spans(word_tokenizer(), [Message("user", "ann"), Message("user", "bob")], template=render_with(template))


def test_messages_are_kept_as_given_and_bad_prompts_are_refused_with_the_reason() -> None:
    given_messages = [Message("system", "hi", public=True), Message("user", [("ann", True)])]
    assert as_messages(given_messages) == given_messages
    assert as_messages([{"role": "system", "content": "hi", "public": True}]) == given_messages[:1]
    with pytest.raises(ValueError, match="no messages"):
        as_messages([])
    with pytest.raises(ValueError, match="says what is private itself; do not also mark it public"):
        Message("user", [("ann", True)], public=True).parts()
    with pytest.raises(TypeError, match=re.escape("a part is a Part or a (text, private) tuple, got 'ann'")):
        Message("user", ["ann"]).parts()
