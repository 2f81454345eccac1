"""The binary wire format, imported by both the client and the server.

A payload is a fixed 30-byte header followed by the mechanism's levels K bit-packed,
n bits each, most significant bit first, exactly ceil(T*k*n/8) bytes:

    offset  size  field
    0       4     magic b"VEIL"
    4       1     version (1)
    5       1     bits n (1..8)
    6       2     flags (none defined in version 1; must be 0)
    8       2     dim k
    10      4     token count T
    14      4     clip c (float32)
    18      4     scale A (float32)
    22      8     projection id (the first 8 bytes of the projected table's SHA-256)

All integers and floats are big-endian. The unused low bits of the last body byte must be zero.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from client_sdk.errors import WireFormatError
from client_sdk.mechanism import MAX_BITS, MechanismParams

MAGIC = b"VEIL"
VERSION = 1
HEADER = struct.Struct("!4sBBHHIff8s")
PROJECTION_ID_BYTES = 8
DEFAULT_MAX_TOKENS = 4096


@dataclass(frozen=True)
class Payload:
    """A decoded (or to-be-encoded) payload: the mechanism settings and the levels K, shape (T, k)."""

    params: MechanismParams
    projection_id: str
    levels: np.ndarray

    @property
    def tokens(self) -> int:
        return int(self.levels.shape[0])


def body_size(tokens: int, dim: int, bits: int) -> int:
    """Bytes of the bit-packed body: ceil(T*k*n / 8)."""
    return (tokens * dim * bits + 7) // 8


def payload_size(tokens: int, dim: int, bits: int) -> int:
    """Bytes of a whole payload, header included."""
    return HEADER.size + body_size(tokens, dim, bits)


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
    return np.packbits(bit_matrix, axis=1).reshape(-1) >> np.uint8(8 - bits)


def projection_id_bytes(projection_id: str) -> bytes:
    try:
        raw = bytes.fromhex(projection_id)
    except ValueError:
        raw = b""
    if len(raw) != PROJECTION_ID_BYTES:
        raise WireFormatError(f"projection id must be {2 * PROJECTION_ID_BYTES} hex characters, got {projection_id!r}")
    return raw


def encode(payload: Payload) -> bytes:
    """Serialise a payload: header then the packed levels."""
    p = payload.params
    levels = np.asarray(payload.levels)
    if levels.ndim != 2 or levels.shape[1] != p.dim:
        raise WireFormatError(f"levels must have shape (tokens, {p.dim}), got {levels.shape}")
    if levels.size and int(levels.max()) > p.levels:
        raise WireFormatError(f"levels must be at most u={p.levels} for {p.bits} bits")
    header = HEADER.pack(
        MAGIC, VERSION, p.bits, 0, p.dim, levels.shape[0], p.clip, p.scale, projection_id_bytes(payload.projection_id)
    )
    return header + pack_levels(levels, p.bits)


def decode(data: bytes, *, projections: Mapping[str, int] | None = None, max_tokens: int = DEFAULT_MAX_TOKENS) -> Payload:
    """Parse and validate a payload; every problem raises `WireFormatError` with a clear message.

    `projections` maps the projection ids the server offers to their k; `max_tokens` bounds T.
    """
    if len(data) < HEADER.size:
        raise WireFormatError(f"payload is {len(data)} bytes, shorter than the {HEADER.size}-byte header")
    magic, version, bits, flags, dim, tokens, clip, scale, pid = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise WireFormatError(f"bad magic {magic!r}: not a veil payload")
    if version != VERSION:
        raise WireFormatError(f"unsupported wire version {version}; this side speaks version {VERSION}")
    if not 1 <= bits <= MAX_BITS:
        raise WireFormatError(f"bits n={bits} outside 1..{MAX_BITS}")
    if flags != 0:
        raise WireFormatError(f"unknown flags 0x{flags:04x} for wire version {VERSION}")
    projection_id = pid.hex()
    if projections is not None and projection_id not in projections:
        raise WireFormatError(f"unknown projection id {projection_id}; the bundle offers {sorted(projections)}")
    if dim == 0 or (projections is not None and dim != projections[projection_id]):
        expected = projections[projection_id] if projections is not None else "at least 1"
        raise WireFormatError(f"dim k={dim} does not match the projection's k={expected}")
    if tokens == 0:
        raise WireFormatError("payload carries no tokens")
    if tokens > max_tokens:
        raise WireFormatError(f"payload carries {tokens} tokens, over the limit of {max_tokens}")
    if not (math.isfinite(clip) and math.isfinite(scale) and 0 < clip < scale):
        raise WireFormatError(f"invalid mechanism settings: clip c={clip}, scale A={scale} (need 0 < c < A)")
    expected = body_size(tokens, dim, bits)
    actual = len(data) - HEADER.size
    if actual < expected:
        raise WireFormatError(f"payload truncated: body is {actual} bytes, expected {expected}")
    if actual > expected:
        raise WireFormatError(f"payload has {actual - expected} trailing bytes after the body")
    params = MechanismParams(bits=bits, dim=dim, clip=clip, scale=scale)
    levels = unpack_levels(data[HEADER.size :], bits, tokens * dim).reshape(tokens, dim)
    return Payload(params=params, projection_id=projection_id, levels=levels)
