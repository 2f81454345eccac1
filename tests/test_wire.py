"""The wire format: exact sizes, round trips over (n, k, T), and a typed error for every malformation."""

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client_sdk import wire
from client_sdk.errors import WireFormatError
from client_sdk.mechanism import MechanismParams, max_scale

PID = "0123456789abcdef"


def make_payload(bits: int = 4, dim: int = 8, tokens: int = 3, seed: int = 0) -> wire.Payload:
    params = MechanismParams(bits=bits, dim=dim, clip=0.05, scale=0.5)
    levels = np.random.default_rng(seed).integers(0, params.levels + 1, size=(tokens, dim), dtype=np.uint8)
    return wire.Payload(params=params, projection_id=PID, levels=levels)


@settings(max_examples=300, deadline=None)
@given(bits=st.integers(1, 8), dim=st.integers(1, 300), tokens=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_round_trip_and_exact_size(bits: int, dim: int, tokens: int, seed: int) -> None:
    payload = make_payload(bits, dim, tokens, seed)
    data = wire.encode(payload)
    assert len(data) == wire.HEADER.size + 4 + -(-tokens * dim * bits // 8) == wire.payload_size(tokens, dim, bits)
    back = wire.decode(data, projections={PID: dim})
    assert back.params == payload.params and back.projection_id == PID
    assert np.array_equal(back.levels, payload.levels)


def test_bit_order_is_msb_first() -> None:
    assert wire.pack_levels(np.array([1, 2, 3], dtype=np.uint8), 2) == bytes([0b01101100])
    assert wire.pack_levels(np.array([15, 0, 9], dtype=np.uint8), 4) == bytes([0xF0, 0x90])
    assert wire.unpack_levels(bytes([0xF0, 0x90]), 4, 3).tolist() == [15, 0, 9]  # count values, flat


def test_the_size_bound_covers_every_payload_of_at_most_that_many_tokens() -> None:
    # the worst case of each part at once: every token a span of its own, public and private, at 8 bits
    assert wire.max_payload_size(5, 7) == wire.payload_size(5, 7, wire.MAX_BITS, public=5, spans=5)


def patch_header(data: bytes, **fields: object) -> bytes:
    names = ["magic", "version", "bits", "flags", "dim", "tokens", "private", "clip", "scale", "pid", "spans"]
    values = dict(zip(names, wire.HEADER.unpack_from(data)))
    values.update(fields)
    return wire.HEADER.pack(*(values[n] for n in names)) + data[wire.HEADER.size :]


GOOD = wire.encode(make_payload())


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "shorter than"),
        (GOOD[:10], "shorter than"),
        (patch_header(GOOD, magic=b"NOPE"), "bad magic"),
        (patch_header(GOOD, version=3), "unsupported wire version"),
        (patch_header(GOOD, bits=0), "outside 1..8"),
        (patch_header(GOOD, bits=9), "outside 1..8"),
        (patch_header(GOOD, flags=1), "unknown flags"),
        (patch_header(GOOD, dim=9), "does not match"),
        (patch_header(GOOD, pid=b"\xff" * 8), "unknown projection id"),
        (patch_header(GOOD, tokens=0), "no tokens"),
        (patch_header(GOOD, private=4), "exceeds the token count"),
        (patch_header(GOOD, spans=0), "span count"),
        (patch_header(GOOD, tokens=4), "truncated"),
        (patch_header(GOOD, tokens=10_000), "over the limit"),
        (patch_header(GOOD, scale=0.01), "need 0 < c < A"),
        (patch_header(GOOD, clip=float("nan")), "need 0 < c < A"),
        (GOOD[:-1], "truncated"),
        (GOOD + b"\x00", "trailing"),
    ],
)
def test_malformed_payloads_are_rejected_with_a_clear_message(data: bytes, message: str) -> None:
    with pytest.raises(WireFormatError, match=message):
        wire.decode(data, projections={PID: 8}, max_tokens=4096)


def test_nonzero_padding_is_rejected() -> None:
    data = wire.encode(make_payload(bits=3, dim=5, tokens=1))  # 15 bits: one padding bit
    with pytest.raises(WireFormatError, match="padding"):
        wire.decode(data[:-1] + bytes([data[-1] | 1]))


def test_encode_refuses_levels_that_do_not_fit() -> None:
    payload = make_payload(bits=2)
    bad = wire.Payload(payload.params, PID, np.full((1, 8), 4, dtype=np.uint8))
    with pytest.raises(WireFormatError, match="at most"):
        wire.encode(bad)
    with pytest.raises(WireFormatError, match="projection id"):
        wire.encode(wire.Payload(payload.params, "xyz", payload.levels))


def test_header_layout_is_36_bytes_big_endian() -> None:
    assert wire.HEADER.size == 36
    assert GOOD[:4] == b"VEIL" and GOOD[4] == 2 and struct.unpack("!H", GOOD[8:10])[0] == 8
    assert struct.unpack("!II", GOOD[10:18]) == (3, 3) and struct.unpack("!HI", GOOD[34:40]) == (1, (1 << 31) | 3)


def mixed_payload() -> wire.Payload:
    base = make_payload(tokens=3)
    return wire.Payload(base.params, PID, base.levels, public_ids=np.array([5, 70000, 1]),
                        spans=(wire.Span(False, 2), wire.Span(True, 3), wire.Span(False, 1)))


def test_spans_round_trip_in_order_with_public_ids_in_the_clear() -> None:
    payload = mixed_payload()
    data = wire.encode(payload)
    assert len(data) == wire.payload_size(3, 8, 4, public=3, spans=3)
    assert data[36:48] == struct.pack("!III", 2, (1 << 31) | 3, 1)  # the span table
    assert data[48:60] == struct.pack("!III", 5, 70000, 1)  # public ids, as they are
    back = wire.decode(data, projections={PID: 8}, vocab_size=70001)
    assert back.spans == payload.spans and back.public_ids.tolist() == [5, 70000, 1]
    assert back.public_ids.dtype == np.int64  # native integers, as the server's embedding lookup takes them
    assert np.array_equal(back.levels, payload.levels)
    assert [(s.private, d.tolist()) for s, d in back.segments()][0] == (False, [5, 70000])


def test_public_ids_outside_the_vocabulary_are_rejected() -> None:
    with pytest.raises(WireFormatError, match="outside the vocabulary"):
        wire.decode(wire.encode(mixed_payload()), vocab_size=70000)


def test_bad_span_tables_are_rejected() -> None:
    data = bytearray(wire.encode(mixed_payload()))
    data[36:40] = struct.pack("!I", 0)
    with pytest.raises(WireFormatError, match="span"):
        wire.decode(bytes(data))
    data[36:40] = struct.pack("!I", 1)
    with pytest.raises(WireFormatError, match="add up"):
        wire.decode(bytes(data))


def test_a_prompt_without_private_tokens_carries_no_levels() -> None:
    base = make_payload()
    payload = wire.Payload(base.params, PID, np.zeros((0, 8), np.uint8), public_ids=np.array([1, 2]),
                           spans=(wire.Span(False, 2),))
    data = wire.encode(payload)
    assert len(data) == wire.HEADER.size + 4 + 8
    assert wire.decode(data).private_tokens == 0


def test_version_1_payloads_still_decode_as_one_private_span() -> None:
    payload = make_payload(tokens=2)
    p = payload.params
    v1 = wire.HEADER_V1.pack(b"VEIL", 1, p.bits, 0, p.dim, 2, p.clip, p.scale, bytes.fromhex(PID))
    data = v1 + wire.pack_levels(payload.levels, p.bits)
    back = wire.decode(data, projections={PID: 8})
    assert back.spans == (wire.Span(True, 2),) and np.array_equal(back.levels, payload.levels)
    assert back.params == p and back.projection_id == PID
    with pytest.raises(WireFormatError, match="shorter"):
        wire.decode(v1[:-1])
    # the same checks as version 2: the server's projections and token limit
    with pytest.raises(WireFormatError, match="unknown projection id"):
        wire.decode(data, projections={"f" * 16: 8})
    with pytest.raises(WireFormatError, match="over the limit"):
        wire.decode(data, max_tokens=1)


def test_settings_the_mechanism_refuses_are_wire_errors() -> None:
    # a payload's settings are the sender's fault (WireFormatError, a 400), never a MechanismError from the server
    with pytest.raises(WireFormatError):
        wire.decode(patch_header(GOOD, scale=0.05))  # A = c
    with pytest.raises(WireFormatError, match="dim"):  # k = 0, checked without projections too
        wire.decode(patch_header(GOOD, dim=0)[: wire.payload_size(3, 0, 4)])
    # the largest A the mechanism produces (at MIN_MU) is accepted, anything over it is not
    largest = max_scale(4, 8, wire.decode(GOOD).params.clip)
    assert wire.decode(patch_header(GOOD, scale=largest)).params.scale == largest
    with pytest.raises(WireFormatError, match="over"):
        wire.decode(patch_header(GOOD, scale=largest * 1.001))


def test_the_token_limit_is_inclusive() -> None:
    assert wire.decode(GOOD, max_tokens=3).tokens == 3
    with pytest.raises(WireFormatError, match="over the limit"):
        wire.decode(GOOD, max_tokens=2)


ONE_PUBLIC = (wire.Span(True, 3), wire.Span(False, 1))


@pytest.mark.parametrize(
    ("bad", "named"),
    [(dict(levels=np.zeros((3, 7), np.uint8)), "shape"), (dict(levels=np.zeros(24, np.uint8)), "shape"),
     (dict(public_ids=np.array([-1]), spans=ONE_PUBLIC), "32 bits"),
     (dict(public_ids=np.array([2**32]), spans=ONE_PUBLIC), "32 bits"),
     (dict(public_ids=[2**64], spans=ONE_PUBLIC), "32 bits"),
     (dict(spans=(wire.Span(True, 3), wire.Span(False, 0))), "span"),
     (dict(spans=(wire.Span(True, 2),)), "private spans"), (dict(spans=ONE_PUBLIC), "public spans")],
)
def test_encode_refuses_payloads_it_cannot_write_faithfully(bad: dict, named: str) -> None:
    base = make_payload()
    fields = {"params": base.params, "projection_id": PID, "levels": base.levels, **bad}
    with pytest.raises(WireFormatError, match=named):
        wire.encode(wire.Payload(**fields))


def test_segments_pair_each_span_with_its_own_rows_and_ids() -> None:
    base = make_payload(tokens=4)
    payload = wire.Payload(base.params, PID, base.levels, public_ids=np.array([7, 8, 9]),
                           spans=(wire.Span(True, 1), wire.Span(False, 1), wire.Span(True, 1), wire.Span(False, 1),
                                  wire.Span(False, 1), wire.Span(True, 2)))
    segments = list(payload.segments())
    assert [s for s, _ in segments] == list(payload.spans)
    assert [data.tolist() for span, data in segments if not span.private] == [[7], [8], [9]]
    rows = [data for span, data in segments if span.private]
    assert [r.tolist() for r in rows] == [base.levels[:1].tolist(), base.levels[1:2].tolist(), base.levels[2:].tolist()]
