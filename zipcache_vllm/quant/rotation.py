"""Key rotation: an orthonormal Walsh-Hadamard transform of the head dimension.

A page of a preset with ``key_rotation: hadamard`` stores ``k R`` instead of ``k``,
with ``R = H_D / sqrt(D)`` (Sylvester's Hadamard matrix, ``D`` a power of two).
``R`` is orthonormal and symmetric, so ``R R = I`` and attention is unchanged when
the query is rotated the same way: ``(q R) . (k R) = q . k``. Values are not rotated,
so the attention output needs no inverse.

Why: it is a change of basis that mixes the channels before the per-channel
min/step of the key groups is taken; measured on SmolLM2, it more than halves the
default preset's KL and restores long-context retrieval (docs/RESULTS.md, "Key
rotation"), at no byte cost and one small matmul per layer and step.

:func:`hadamard_rotate` multiplies in float64 by the unscaled +-1 matrix: the
products are exact and so is the sum, whatever order a matmul adds in, unless a row
mixes magnitudes more than 2^23 apart; one scaling and one rounding to float32
follow. So the engine (a step's rows) and the simulator (a block) get the same
bits, which matters: a last-bit difference can move a 2-bit code across a rounding
boundary.
"""
from __future__ import annotations

from functools import lru_cache

import torch


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@lru_cache(maxsize=None)
def _signs(D: int, device: torch.device) -> torch.Tensor:
    """Sylvester's unscaled +-1 Hadamard matrix, float64, on ``device``."""
    if not is_power_of_two(D):
        raise ValueError(f"Hadamard rotation needs a power-of-two head size, got {D}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < D:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h.to(device)


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """``x R`` along the last dimension, float32 (``R`` above; applying it twice is ``x``)."""
    D = x.shape[-1]
    return (x.double() @ _signs(D, x.device)).mul_(D ** -0.5).float()


def hadamard_matrix(D: int) -> torch.Tensor:
    """``R`` itself, float64 (tests and docs)."""
    return _signs(D, torch.device("cpu")) / D ** 0.5
