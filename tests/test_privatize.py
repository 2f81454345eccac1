"""From token spans to wire bytes: private rows through the mechanism, public ids in the clear, span order kept."""

import numpy as np

from client_sdk import wire
from client_sdk.mechanism import MechanismParams, quantize, secure_rng
from client_sdk.privatize import privatize_spans, privatize_tokens
from client_sdk.spans import TokenSpan

PID = "0123456789abcdef"
PARAMS = MechanismParams(bits=4, dim=8, clip=1.0, scale=1.01)
TABLE = np.linspace(-1.0, 1.0, 10 * PARAMS.dim).reshape(10, PARAMS.dim)  # every row different


def span(private: bool, *ids: int) -> TokenSpan:
    return TokenSpan(private, np.array(ids, dtype=np.int64))


def test_private_rows_are_quantized_in_prompt_order_and_public_ids_sent_as_they_are() -> None:
    spans = [span(True, 7, 2), span(False, 5, 6), span(True, 3)]
    payload = privatize_spans(spans, TABLE, PARAMS, PID, secure_rng(1))
    assert payload.params == PARAMS and payload.projection_id == PID
    assert payload.spans == (wire.Span(True, 2), wire.Span(False, 2), wire.Span(True, 1))
    assert np.array_equal(payload.levels, quantize(TABLE[[7, 2, 3]], PARAMS, secure_rng(1)))
    assert payload.public_ids.tolist() == [5, 6]
    back = wire.decode(wire.encode(payload), projections={PID: PARAMS.dim})
    assert back.spans == payload.spans and np.array_equal(back.levels, payload.levels)


def test_an_all_public_prompt_has_no_levels_and_an_all_private_one_no_public_ids() -> None:
    public = privatize_spans([span(False, 4, 9)], TABLE, PARAMS, PID, secure_rng(0))
    assert public.levels.shape == (0, PARAMS.dim) and public.public_ids.tolist() == [4, 9]
    private = privatize_spans([span(True, 4, 9)], TABLE, PARAMS, PID, secure_rng(0))
    assert private.levels.shape == (2, PARAMS.dim)
    assert private.public_ids.shape == (0,) and private.public_ids.dtype == np.int64  # token ids, not floats
    for payload in (public, private):
        assert wire.decode(wire.encode(payload), projections={PID: PARAMS.dim}).spans == payload.spans


def test_the_noise_comes_from_the_given_generator_or_a_fresh_secure_one() -> None:
    spans = [span(True, *range(10))]

    def levels(rng: np.random.Generator | None) -> np.ndarray:
        return privatize_spans(spans, TABLE, PARAMS, PID, rng).levels

    assert np.array_equal(levels(secure_rng(3)), levels(secure_rng(3)))
    assert not np.array_equal(levels(None), levels(None))  # 80 coordinates drawn afresh each time


def test_privatize_tokens_sends_every_token_as_one_private_span() -> None:
    data = privatize_tokens([7, 2, 3], TABLE, PARAMS, PID, secure_rng(5))
    payload = wire.decode(data, projections={PID: PARAMS.dim})
    assert payload.spans == (wire.Span(True, 3),) and payload.projection_id == PID and payload.params == PARAMS
    assert np.array_equal(payload.levels, quantize(TABLE[[7, 2, 3]], PARAMS, secure_rng(5)))
