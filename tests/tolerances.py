"""Every tolerance the tests use, in one place, each with the reason for its value.

The reference quantizer has an analytic error bound (half a stored float16 step,
times the channel scale for values), so most tolerances here are *slacks on top
of that bound* for float32 arithmetic, not fudge factors on the error itself.
Keep them tight: a slack that hides a wrongly computed step hides a real bug.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FP32_ULP = 2.0 ** -23  # float32 spacing at 1.0
FP16_ULP = 2.0 ** -10  # float16 spacing at 1.0
FP16_MAX = 65504.0


@dataclass(frozen=True)
class Tol:
    """``|err| <= bound + atol + rtol * magnitude``; ``reason`` says why these numbers."""

    atol: float
    rtol: float
    reason: str


# Slack added to the half-step bound, keyed by the dtype the caller hands to the
# quantizer. ``magnitude`` is the largest |value| involved (input, min, range).
HALF_STEP_SLACK: dict[torch.dtype, Tol] = {
    torch.float32: Tol(
        atol=1e-30,
        rtol=8 * FP32_ULP,
        reason="float32 arithmetic: x - m, (x - m) / s and q * s + m each round once "
        "(q * s itself is exact: <= 8-bit code times an 11-bit mantissa); a rounding at "
        "the .5 boundary of round() moves the error past s/2 by at most these few ulps",
    ),
    torch.float16: Tol(
        atol=1e-30,
        rtol=8 * FP32_ULP,
        reason="float16 inputs are upcast to float32 exactly before any arithmetic, "
        "so the slack is the float32 one",
    ),
    torch.bfloat16: Tol(
        atol=1e-30,
        rtol=8 * FP32_ULP,
        reason="bfloat16 inputs are upcast to float32 exactly before any arithmetic, "
        "so the slack is the float32 one",
    ),
}

# Values (CSTQ) add two more float32 roundings: v / c before quantizing and
# (q * s + m) * c after; each is relative to |v|.
VALUE_SLACK = Tol(
    atol=1e-30,
    rtol=16 * FP32_ULP,
    reason="key slack plus the division by and multiplication with the channel scale c, "
    "each one float32 rounding relative to |v| (and to |v / c| * c for the grid terms)",
)


def rel_step_bound(bits: int) -> float:
    """Largest stored step, as a fraction of the group's range ``max - min``.

    The ideal step is ``range / (2^b - 1)``; the stored one is rounded up to
    float16 (relative ``2^-10``) after the zero point is rounded down to
    float16, which widens the range by at most one float16 ulp of ``min``
    (covered by the caller's absolute term). A step larger than this means the
    quantizer wastes levels (e.g. divides by ``2^b`` or doubles the range).
    """
    return (1.0 + FP16_ULP) / ((1 << bits) - 1)


@dataclass(frozen=True)
class Ratio:
    """An upper bound on a ratio of two measured errors; ``reason`` says why this number."""

    max: float
    reason: str


# Mean absolute error of salient tokens over that of regular tokens in the same
# blocks, Gaussian data, random mask; keyed by (hi_bits, lo_bits).
SALIENT_ERROR_RATIO: dict[tuple[int, int], Ratio] = {
    (4, 2): Ratio(
        max=0.5,
        reason="4-bit steps are 3/15 = 0.2 of 2-bit steps over similar ranges (the salient "
        "group holds 60% of the tokens, so its per-channel key ranges are a bit wider): "
        "observed 0.20-0.23 for keys and values; 0.5 leaves room for sampling noise but "
        "rejects a swapped or ignored mask (ratio ~5 or ~1)",
    ),
}

# Pure data movement (storage vs token order, float16/bfloat16 upcast, packing) is
# compared bit-exactly with torch.equal: no tolerance.
