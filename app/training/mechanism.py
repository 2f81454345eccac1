"""The DEL mechanism as torch ops, for training with the clip and the quantizer in the loop.

The forward pass draws the exact binomial noise the client draws; the backward pass treats the
quantizer as the identity (a straight-through estimator), which is unbiased because E[A(2K/u - 1)] = v.
"""

from __future__ import annotations

import torch


def privatize(z: torch.Tensor, clip: float, scale: torch.Tensor | float, bits: int,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Clip z to [-c, c], then quantize stochastically: forward A(2K/u - 1), backward identity (within the clip).

    `scale` is A, a float or a tensor broadcastable to z (one A per example when training over a range of mu).
    """
    clipped = z.clamp(-clip, clip)
    levels = 2**bits - 1
    scale = torch.as_tensor(scale, dtype=z.dtype, device=z.device)
    with torch.no_grad():
        p = ((scale + clipped) / (2 * scale)).clamp(0.0, 1.0)
        counts = torch.binomial(torch.full_like(p, float(levels)), p, generator=generator)
        noisy = scale * (2 * counts / levels - 1)
    return clipped + (noisy - clipped).detach()
