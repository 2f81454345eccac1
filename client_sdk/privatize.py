"""From token spans to wire bytes: projected-table lookup, clip, stochastic quantization, bit-packing.

Only private spans go through the mechanism; public spans' token ids are sent as they are.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from client_sdk import wire
from client_sdk.mechanism import MechanismParams, quantize, secure_rng
from client_sdk.spans import TokenSpan


def privatize_spans(
    spans: Sequence[TokenSpan],
    projected_table: np.ndarray,
    params: MechanismParams,
    projection_id: str,
    rng: np.random.Generator | None = None,
) -> wire.Payload:
    """The device-side path for one prompt: private spans become levels, public spans stay token ids.

    `rng` defaults to a generator freshly seeded from the OS's secure source.
    """
    private_ids = [s.ids for s in spans if s.private]
    public_ids = [s.ids for s in spans if not s.private]
    z = projected_table[np.concatenate(private_ids).astype(np.int64)] if private_ids else np.zeros((0, params.dim))
    levels = quantize(z, params, rng if rng is not None else secure_rng())
    return wire.Payload(params=params, projection_id=projection_id, levels=levels,
                        public_ids=np.concatenate(public_ids) if public_ids else np.zeros(0, dtype=np.int64),
                        spans=tuple(wire.Span(s.private, len(s.ids)) for s in spans))


def privatize_tokens(
    token_ids: np.ndarray,
    projected_table: np.ndarray,
    params: MechanismParams,
    projection_id: str,
    rng: np.random.Generator | None = None,
) -> bytes:
    """Every token private (one span): the wire bytes."""
    span = TokenSpan(True, np.asarray(token_ids, dtype=np.int64))
    return wire.encode(privatize_spans([span], projected_table, params, projection_id, rng))
