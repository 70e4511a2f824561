"""KV policies, one small class each behind :class:`KVPolicy` (recipe: docs/POLICIES.md).

Every module of this package is imported here; each policy class registers its preset
``method`` name with :func:`~.base.register`. So a new method is one module with one
class, and one preset YAML.
"""
import importlib
import pkgutil

from ..config import Preset, PresetError, load_preset
from .base import POLICIES, KVPolicy, NoCompression, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from .fastgen import FastGenPolicy  # noqa: E402  (registered above; re-exported)


def make_policy(preset: Preset | str) -> KVPolicy:
    """The policy object for a preset (or a preset name)."""
    if isinstance(preset, str):
        preset = load_preset(preset)
    cls = POLICIES.get(preset.method)
    if cls is None:
        raise PresetError(f"preset {preset.name!r}: unknown method {preset.method!r}; methods: "
                          f"{', '.join(sorted(POLICIES))} (a new method is a class registered in "
                          "zipcache_vllm/policies/, docs/POLICIES.md)")
    return cls(preset)


__all__ = ["KVPolicy", "POLICIES", "make_policy", "register", "FastGenPolicy", "NoCompression"]
