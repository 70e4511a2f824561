"""KV policies, one small class each behind :class:`KVPolicy` (recipe: docs/POLICIES.md)."""
from ..config import Preset, load_preset
from .base import KVPolicy, NoCompression
from .fastgen import FastGenPolicy
from .h2o_mixed import H2OMixedPolicy
from .kivi import KiviPolicy
from .random_mixed import RandomMixedPolicy
from .zipcache import ZipCachePolicy

POLICIES: dict[str, type[KVPolicy]] = {
    "none": NoCompression,
    "kivi": KiviPolicy,
    "zipcache": ZipCachePolicy,
    "h2o_mixed": H2OMixedPolicy,
    "random_mixed": RandomMixedPolicy,
    "fastgen": FastGenPolicy,
}


def make_policy(preset: Preset | str) -> KVPolicy:
    """The policy object for a preset (or a preset name)."""
    if isinstance(preset, str):
        preset = load_preset(preset)
    return POLICIES[preset.method](preset)


__all__ = ["KVPolicy", "POLICIES", "make_policy", "FastGenPolicy", "NoCompression"]
