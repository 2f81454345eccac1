"""From token ids to wire bytes: projected-table lookup, clip, stochastic quantization, bit-packing."""

from __future__ import annotations

import numpy as np

from client_sdk import wire
from client_sdk.mechanism import MechanismParams, quantize, secure_rng


def privatize_tokens(
    token_ids: np.ndarray,
    projected_table: np.ndarray,
    params: MechanismParams,
    projection_id: str,
    rng: np.random.Generator | None = None,
) -> bytes:
    """The whole device-side path for one prompt; the result is all that leaves the device.

    `rng` defaults to a generator freshly seeded from the OS's secure source.
    """
    z = projected_table[np.asarray(token_ids, dtype=np.int64)]
    levels = quantize(z, params, rng if rng is not None else secure_rng())
    return wire.encode(wire.Payload(params=params, projection_id=projection_id, levels=levels))
