"""``--kv-cache-dtype`` names of the plugin and the presets they select.

``zipcache`` selects the default preset (``configs/zipcache.yaml``);
``zipcache_<preset>`` selects another quantizing preset: ``zipcache_kivi2``
(preset ``kivi2``), ``zipcache_hc`` (preset ``zipcache_hc``: a preset whose
name already starts with ``zipcache_`` keeps it). The list is computed from
the preset files, so adding a YAML file adds a dtype. Presets that do not
have no pages (``none``, offline-only ``fastgen`` without ``slots``) have no dtype
here; paged FastGen presets do (``zipcache_fastgen_t95``, ``zipcache_fastgen``).

No vLLM import: tests and the CLI use this without starting vLLM.
"""
from __future__ import annotations

from .config import DEFAULT_PRESET, Preset, list_presets, load_preset

PREFIX = "zipcache"


def dtype_for_preset(preset_name: str) -> str:
    """The ``--kv-cache-dtype`` string that selects ``preset_name``."""
    if preset_name == DEFAULT_PRESET:
        return PREFIX
    if preset_name.startswith(PREFIX + "_"):
        return preset_name
    return f"{PREFIX}_{preset_name}"


def cache_dtypes() -> dict[str, str]:
    """``{cache dtype: preset name}`` for every preset in ``configs/`` that stores pages."""
    out = {}
    for name in list_presets():
        preset = load_preset(name)
        if preset.quantizes or preset.paged_fastgen:  # paged FastGen: docs/FASTGEN.md
            out[dtype_for_preset(name)] = name
    return out


def is_zipcache_dtype(cache_dtype: str | None) -> bool:
    """True for any string in our namespace (valid or not): ``zipcache`` or ``zipcache_*``."""
    return isinstance(cache_dtype, str) and (
        cache_dtype == PREFIX or cache_dtype.startswith(PREFIX + "_"))


def preset_for_dtype(cache_dtype: str) -> Preset:
    """The preset a cache dtype selects; unknown names list the valid ones."""
    table = cache_dtypes()
    if cache_dtype not in table:
        raise ValueError(
            f"unknown zipcache KV cache dtype {cache_dtype!r}; valid: {', '.join(sorted(table))}")
    return load_preset(table[cache_dtype])
