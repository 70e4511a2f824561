"""Accumulated attention (H2O / MiKV) picks the salient tokens, at the zipcache bit mix."""
from .base import KVPolicy, register


@register("h2o_mixed")
class H2OMixedPolicy(KVPolicy):
    """Salient = top accumulated probe attention (not divided by how many probes saw it)."""

    def rank(self, score, count, block_starts, window_ends=None):
        return score
