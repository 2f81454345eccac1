"""The binary wire format, imported by both the client and the server.

Version 2 (what the client sends) carries a prompt as ordered spans: a public span's token ids in the
clear, a private span's mechanism levels K. A 36-byte header, then the span table, then the public
token ids, then the private tokens' levels bit-packed, n bits each, most significant bit first:

    offset  size  field
    0       4     magic b"VEIL"
    4       1     version (2)
    5       1     bits n (1..8)
    6       2     flags (none defined; must be 0)
    8       2     dim k
    10      4     token count T (all spans)
    14      4     private token count P
    18      4     clip c (float32)
    22      4     scale A (float32)
    26      8     projection id (the first 8 bytes of the projected table's SHA-256)
    34      2     span count S
    36      4*S   spans, in prompt order: bit 31 set for a private span, bits 0..30 its length (>= 1)
    ...     4*(T-P)  public token ids (uint32), the public spans' tokens in order
    ...     ceil(P*k*n/8)  the private spans' levels, (P, k) row-major

All integers and floats are big-endian; the unused low bits of the last byte must be zero. The header
always carries the mechanism settings, even when P = 0. Version 1 (a 30-byte header without the
private count and span table: every token private) still decodes, as one private span.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import numpy as np

from client_sdk.errors import WireFormatError
from client_sdk.mechanism import MAX_BITS, MIN_MU, MechanismParams, max_scale

MAGIC = b"VEIL"
VERSION = 2
HEADER = struct.Struct("!4sBBHHIIff8sH")
HEADER_V1 = struct.Struct("!4sBBHHIff8s")
SPAN = struct.Struct("!I")
PRIVATE_BIT = 1 << 31
PROJECTION_ID_BYTES = 8
DEFAULT_MAX_TOKENS = 4096


@dataclass(frozen=True)
class Span:
    """`length` consecutive tokens of the prompt, private (levels on the wire) or public (ids in the clear)."""

    private: bool
    length: int


@dataclass(frozen=True)
class Payload:
    """A decoded (or to-be-encoded) prompt: mechanism settings, ordered spans, public ids and private levels.

    `levels` (P, k) are the private tokens' levels in prompt order, `public_ids` (T - P,) the public tokens'
    ids in prompt order. Without `spans`, the whole prompt is one private span (version 1's meaning).
    """

    params: MechanismParams
    projection_id: str
    levels: np.ndarray
    public_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    spans: tuple[Span, ...] = ()

    def __post_init__(self) -> None:
        if not self.spans and len(self.levels):
            object.__setattr__(self, "spans", (Span(True, int(self.levels.shape[0])),))

    @property
    def tokens(self) -> int:
        return sum(s.length for s in self.spans)

    @property
    def private_tokens(self) -> int:
        return int(self.levels.shape[0])

    @property
    def public_tokens(self) -> int:
        return int(len(self.public_ids))

    def segments(self) -> Iterator[tuple[Span, np.ndarray]]:
        """Each span with its data, in order: token ids for a public span, levels (length, k) for a private one."""
        pub = priv = 0
        for span in self.spans:
            if span.private:
                yield span, self.levels[priv : priv + span.length]
                priv += span.length
            else:
                yield span, self.public_ids[pub : pub + span.length]
                pub += span.length


def body_size(tokens: int, dim: int, bits: int) -> int:
    """Bytes of the bit-packed levels of `tokens` private tokens: ceil(T*k*n / 8)."""
    return (tokens * dim * bits + 7) // 8


def payload_size(private: int, dim: int, bits: int, *, public: int = 0, spans: int = 1) -> int:
    """Bytes of a whole version-2 payload."""
    return HEADER.size + SPAN.size * spans + 4 * public + body_size(private, dim, bits)


def max_payload_size(max_tokens: int, dim: int) -> int:
    """An upper bound on any valid payload of at most `max_tokens` tokens at this k."""
    return HEADER.size + SPAN.size * max_tokens + 4 * max_tokens + body_size(max_tokens, dim, MAX_BITS)


def pack_levels(levels: np.ndarray, bits: int) -> bytes:
    """Bit-pack values in [0, 2**bits - 1], `bits` each, MSB first."""
    flat = np.ascontiguousarray(levels, dtype=np.uint8).reshape(-1)
    if bits == 8:
        return flat.tobytes()
    bit_matrix = np.unpackbits(flat[:, None], axis=1)[:, 8 - bits :]
    return np.packbits(bit_matrix.reshape(-1)).tobytes()


def unpack_levels(body: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_levels` for `count` values; rejects non-zero padding bits."""
    raw = np.frombuffer(body, dtype=np.uint8)
    if bits == 8:
        return raw[:count].copy()
    all_bits = np.unpackbits(raw)
    if all_bits[count * bits :].any():
        raise WireFormatError("payload padding bits after the last value are not zero")
    bit_matrix = all_bits[: count * bits].reshape(count, bits)
    return np.packbits(bit_matrix, axis=1).ravel() >> np.uint8(8 - bits)


def projection_id_bytes(projection_id: str) -> bytes:
    try:
        raw = bytes.fromhex(projection_id)
    except ValueError:
        raw = b""
    if len(raw) != PROJECTION_ID_BYTES:
        raise WireFormatError(f"projection id must be {2 * PROJECTION_ID_BYTES} hex characters, got {projection_id!r}")
    return raw


def encode(payload: Payload) -> bytes:
    """Serialise a payload (version 2): header, span table, public ids, packed levels."""
    p = payload.params
    levels = np.asarray(payload.levels)
    public_ids = np.asarray(payload.public_ids)
    if levels.ndim != 2 or levels.shape[1] != p.dim:
        raise WireFormatError(f"levels must have shape (tokens, {p.dim}), got {levels.shape}")
    if levels.size and int(levels.max()) > p.levels:
        raise WireFormatError(f"levels must be at most u={p.levels} for {p.bits} bits")
    if any(not 1 <= s.length < PRIVATE_BIT for s in payload.spans):
        raise WireFormatError("every span must hold at least one token")
    if sum(s.length for s in payload.spans if s.private) != levels.shape[0]:
        raise WireFormatError("the private spans' lengths do not add up to the levels' rows")
    if sum(s.length for s in payload.spans if not s.private) != len(public_ids):
        raise WireFormatError("the public spans' lengths do not add up to the public token ids")
    if public_ids.size and (public_ids.min() < 0 or public_ids.max() >= 2**32):
        raise WireFormatError("public token ids must fit in 32 bits")
    header = HEADER.pack(MAGIC, VERSION, p.bits, 0, p.dim, payload.tokens, levels.shape[0], p.clip, p.scale,
                         projection_id_bytes(payload.projection_id), len(payload.spans))
    spans = b"".join(SPAN.pack(s.length | (PRIVATE_BIT if s.private else 0)) for s in payload.spans)
    return header + spans + public_ids.astype(">u4").tobytes() + pack_levels(levels, p.bits)


def _check_settings(bits: int, flags: int, dim: int, clip: float, scale: float, projection_id: str,
                    projections: Mapping[str, int] | None, version: int) -> MechanismParams:
    if not 1 <= bits <= MAX_BITS:
        raise WireFormatError(f"bits n={bits} outside 1..{MAX_BITS}")
    if flags != 0:
        raise WireFormatError(f"unknown flags 0x{flags:04x} for wire version {version}")
    if projections is not None and projection_id not in projections:
        raise WireFormatError(f"unknown projection id {projection_id}; the bundle offers {sorted(projections)}")
    if dim == 0:
        raise WireFormatError("dim k=0: a payload needs k >= 1")
    if projections is not None and dim != projections[projection_id]:
        raise WireFormatError(f"dim k={dim} does not match the projection's k={projections[projection_id]}")
    if not (math.isfinite(clip) and math.isfinite(scale) and 0 < clip < scale):
        raise WireFormatError(f"invalid mechanism settings: clip c={clip}, scale A={scale} (need 0 < c < A)")
    if scale > (bound := max_scale(bits, dim, clip)):
        raise WireFormatError(f"scale A={scale:g} is over {bound:g}, the largest the mechanism produces for n={bits}, "
                              f"k={dim}, c={clip:g} (at mu={MIN_MU:g})")
    return MechanismParams(bits=bits, dim=dim, clip=clip, scale=scale)


def _check_size(actual: int, expected: int) -> None:
    if actual < expected:
        raise WireFormatError(f"payload truncated: {actual} bytes, expected {expected}")
    if actual > expected:
        raise WireFormatError(f"payload has {actual - expected} trailing bytes")


def _check_tokens(tokens: int, max_tokens: int) -> None:
    if tokens == 0:
        raise WireFormatError("payload carries no tokens")
    if tokens > max_tokens:
        raise WireFormatError(f"payload carries {tokens} tokens, over the limit of {max_tokens}")


def _decode_v1(data: bytes, projections: Mapping[str, int] | None, max_tokens: int) -> Payload:
    if len(data) < HEADER_V1.size:
        raise WireFormatError(f"payload is {len(data)} bytes, shorter than the {HEADER_V1.size}-byte header")
    _, version, bits, flags, dim, tokens, clip, scale, pid = HEADER_V1.unpack_from(data)
    params = _check_settings(bits, flags, dim, clip, scale, pid.hex(), projections, version)
    _check_tokens(tokens, max_tokens)
    _check_size(len(data), HEADER_V1.size + body_size(tokens, dim, bits))
    levels = unpack_levels(data[HEADER_V1.size :], bits, tokens * dim).reshape(tokens, dim)
    return Payload(params=params, projection_id=pid.hex(), levels=levels)


def decode(data: bytes, *, projections: Mapping[str, int] | None = None, max_tokens: int = DEFAULT_MAX_TOKENS,
           vocab_size: int | None = None) -> Payload:
    """Parse and validate a payload (version 2, or 1); every problem raises `WireFormatError` with a clear message.

    `projections` maps the projection ids the server offers to their k; `max_tokens` bounds T;
    `vocab_size` bounds the public token ids.
    """
    if len(data) < 5:
        raise WireFormatError(f"payload is {len(data)} bytes, shorter than the {HEADER.size}-byte header")
    if data[:4] != MAGIC:
        raise WireFormatError(f"bad magic {data[:4]!r}: not a veil payload")
    if data[4] == 1:
        return _decode_v1(data, projections, max_tokens)
    if data[4] != VERSION:
        raise WireFormatError(f"unsupported wire version {data[4]}; this side speaks versions 1 and {VERSION}")
    if len(data) < HEADER.size:
        raise WireFormatError(f"payload is {len(data)} bytes, shorter than the {HEADER.size}-byte header")
    _, version, bits, flags, dim, tokens, private, clip, scale, pid, span_count = HEADER.unpack_from(data)
    params = _check_settings(bits, flags, dim, clip, scale, pid.hex(), projections, version)
    _check_tokens(tokens, max_tokens)
    if private > tokens:
        raise WireFormatError(f"private token count {private} exceeds the token count {tokens}")
    if not 1 <= span_count <= tokens:
        raise WireFormatError(f"span count {span_count} outside 1..{tokens}")
    public = tokens - private
    _check_size(len(data), payload_size(private, dim, bits, public=public, spans=span_count))
    offset = HEADER.size
    words = np.frombuffer(data, dtype=">u4", count=span_count, offset=offset).astype(np.int64)
    offset += SPAN.size * span_count
    spans = tuple(Span(bool(w & PRIVATE_BIT), int(w & (PRIVATE_BIT - 1))) for w in words)
    if any(s.length == 0 for s in spans):
        raise WireFormatError("a span holds no tokens")
    if sum(s.length for s in spans) != tokens or sum(s.length for s in spans if s.private) != private:
        raise WireFormatError("the span lengths do not add up to the header's token counts")
    public_ids = np.frombuffer(data, dtype=">u4", count=public, offset=offset).astype(np.int64)
    offset += 4 * public
    if vocab_size is not None and public and int(public_ids.max()) >= vocab_size:
        raise WireFormatError(f"public token id {int(public_ids.max())} is outside the vocabulary (size {vocab_size})")
    levels = unpack_levels(data[offset:], bits, private * dim).reshape(private, dim)
    return Payload(params=params, projection_id=pid.hex(), levels=levels, public_ids=public_ids, spans=spans)
