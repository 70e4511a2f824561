"""Token saliency from attention: ZipCache's normalized score, probes, H2O's accumulated score."""
from .scores import (
    accumulated_scores,
    exact_normalized_attention,
    gqa_aggregate,
    normalize_accumulated,
    normalized_scores,
    probe_mass,
    probe_rows,
    visible_counts,
)

__all__ = [
    "accumulated_scores",
    "exact_normalized_attention",
    "gqa_aggregate",
    "normalize_accumulated",
    "normalized_scores",
    "probe_mass",
    "probe_rows",
    "visible_counts",
]
