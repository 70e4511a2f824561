"""KIVI-style uniform quantization: per-channel keys, per-token values, no saliency."""
import torch

from .base import KVPolicy, register


@register("kivi")
class KiviPolicy(KVPolicy):
    """Every token at the same bits (``n_salient = 0``): the ranking picks nothing."""

    def rank(self, score, count, block_starts, window_ends=None):
        return torch.zeros_like(score)
