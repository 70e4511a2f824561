"""Accumulated attention (H2O / MiKV) picks the salient tokens, at the zipcache bit mix."""
from ..saliency import accumulated_scores
from .base import KVPolicy


class H2OMixedPolicy(KVPolicy):
    def block_scores(self, probs, probe_pos, key_pos, num_kv_heads, window_end, seed):
        return accumulated_scores(probs, num_kv_heads)
