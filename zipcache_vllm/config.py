"""KV policy presets: YAML files validated by pydantic.

A preset names a method and its parameters. ``load_preset("zipcache")`` reads
``zipcache.yaml``; a bad file raises :class:`PresetError` naming the file, the field
and the allowed values.

Where presets come from:

* the built-in ones, :data:`CONFIG_DIR`: the repository's ``configs/`` (editable
  install) or its copy inside the installed package (wheel), see :mod:`.resources`;
* plus the user's: every ``<name>.yaml`` in the folder named by ``ZIPCACHE_VLLM_CONFIG_DIR``
  (the variable is read at each lookup, so every vLLM process follows its own environment;
  a folder's listing is read once per process).

A user preset may not take a built-in preset's name: ``--kv-cache-dtype zipcache`` must
mean the same thing on every machine, so a differing file of that name is refused with a
:class:`PresetError` that says to rename it (a byte-identical copy, e.g. the whole
``configs/`` folder copied next to one's own files, is accepted). An install whose
built-in presets are missing is refused too, instead of serving no zipcache dtypes.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .resources import data_dir

CONFIG_DIR = data_dir("configs")  # the built-in presets; hardware/ and models/ are catalogs, not presets
USER_CONFIG_ENV = "ZIPCACHE_VLLM_CONFIG_DIR"
DEFAULT_PRESET = "zipcache"

# Methods with a flow of their own; every other method is a quantizing policy (a class
# registered in zipcache_vllm/policies/, which also checks that the name exists).
NON_QUANTIZING_METHODS = ("none", "fastgen")
# The saliency a method's class ranks by, where it is not normalized attention: the
# preset field must agree with the class (FastGen chooses its own).
IMPLIED_SALIENCY = {"h2o_mixed": "accumulated", "random_mixed": "random"}


class PresetError(ValueError):
    """A preset that does not exist or does not validate."""


class ProbeConfig(BaseModel):
    """Which queries score the tokens of a block (saliency), and how scores are normalized."""

    model_config = ConfigDict(extra="forbid")

    strategy: Literal["exact", "recent_random", "recent", "random"] = Field(
        "recent_random", description="exact: every query that sees the token; otherwise a probe subset")
    recent_frac: float = Field(0.05, ge=0.0, le=1.0, description="share of the window's most recent queries")
    random_frac: float = Field(0.05, ge=0.0, le=1.0, description="share drawn at random from the other queries")
    min_probes: int = Field(4, ge=1, description="at least this many probe queries per window")
    normalize: Literal["visible", "l_minus_i"] = Field(
        "visible", description="divide accumulated attention by the probe rows that see the token, or by L - i")
    seed: int = Field(0, description="seed of the random probes (mixed with the window's start position)")


class FastGenConfig(BaseModel):
    """FastGen's hybrid policy profiling (ICLR 2024)."""

    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(0.95, gt=0.0, le=1.0, description="T: kept attention mass required")
    r_local: float = Field(0.3, gt=0.0, le=1.0, description="local window, share of the length")
    r_frequent: float = Field(0.3, gt=0.0, le=1.0, description="heavy hitters, share of the length")
    kept_bits: Literal[16, 8] = Field(16, description="storage of kept tokens: bf16 or 8-bit")
    slots: Optional[int] = Field(
        None, ge=8, description="engine pages: kept token slots per (block, KV head), a multiple of 8 "
        "<= block_size (docs/FASTGEN.md); unset = offline-only FastGen (attention masking, no pages)")
    mixed: bool = Field(False, description="kept tokens stored with ZipCache's mixed precision "
                        "(hi_bits / lo_bits, salient_ratio of the slots) instead of kept_bits")


class Preset(BaseModel):
    """One KV cache policy with its parameters."""

    model_config = ConfigDict(extra="forbid")

    name: str
    method: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description=(
        "the policy: none, fastgen, or a quantizing method registered in zipcache_vllm/policies/ "
        "(kivi, zipcache, h2o_mixed, random_mixed, ...)"))
    description: str = ""
    block_size: int = Field(128, ge=16, le=1024, multiple_of=16, description="tokens per page")
    hi_bits: Literal[2, 3, 4, 8] = Field(4, description="bit width of salient tokens")
    lo_bits: Literal[2, 3, 4, 8] = Field(2, description="bit width of regular tokens")
    salient_ratio: float = Field(0.5, ge=0.0, le=1.0, description="share of each block kept at hi_bits")
    topk_scope: Literal["block", "sequence"] = Field(
        "block", description="rank saliency per block (what the engine stores) or over the sequence (offline only)")
    saliency_source: Optional[Literal["normalized", "accumulated", "random"]] = Field(
        None, description="normalized attention (ZipCache), accumulated attention (H2O), or random: "
        "chosen by the method (h2o_mixed: accumulated, random_mixed: random, others normalized); "
        "a fastgen preset may set it to rank the tokens of its slots")
    key_rotation: Literal["none", "hadamard", "calibrated"] = Field(
        "none", description="store keys Hadamard-rotated (same bytes; quant/rotation.py): in "
        "every layer (hadamard), or in the layers where the model's calibration measured that "
        "it lowers the attention error (calibrated; every layer without a calibration; "
        "zipcache_vllm/calibration.py)")
    value_rotation: Literal["none", "hadamard"] = Field(
        "none", description="store values Hadamard-rotated, the attention output rotated back "
        "(same bytes; quant/rotation.py)")
    probes: ProbeConfig = Field(default_factory=ProbeConfig)
    fastgen: Optional[FastGenConfig] = None
    staging_bits: Optional[Literal[8]] = Field(
        None, description="bits of a staged K/V element while its block fills: 8 (each token's "
        "row quantized on its own, float16 min/step: about half the staging blocks a running "
        "request holds) or unset (the model dtype); layout.StagingLayout")
    saliency_delay: int = Field(
        0, ge=0, le=2, description="blocks a filled block waits in staging before it is packed, "
        "so that the probe rows of the next saliency_delay blocks score its tokens too (0: packed "
        "when it fills); each costs a block of staging per running request and layer, and a "
        "block is prefix-cached once it is packed (engine/step.py, docs/RESULTS.md)")

    @model_validator(mode="after")
    def _consistent(self) -> "Preset":
        if self.lo_bits > self.hi_bits:
            raise ValueError(f"lo_bits ({self.lo_bits}) must not exceed hi_bits ({self.hi_bits})")
        if self.method == "kivi" and (self.hi_bits != self.lo_bits):
            raise ValueError("kivi is uniform: hi_bits must equal lo_bits")
        if self.method == "fastgen" and self.fastgen is None:
            raise ValueError("method fastgen needs a 'fastgen' section (threshold, r_local, r_frequent)")
        if self.method != "fastgen" and self.fastgen is not None:
            raise ValueError(f"a 'fastgen' section is only valid with method fastgen, not {self.method}")
        if self.key_rotation != "none" and not self.quantizes:
            raise ValueError(f"key_rotation applies to quantized pages, not to method {self.method}")
        if self.value_rotation != "none" and not self.quantizes:
            raise ValueError(f"value_rotation applies to quantized pages, not to method {self.method}")
        implied = IMPLIED_SALIENCY.get(self.method, "normalized")
        if self.method != "fastgen" and self.saliency_source not in (None, implied):
            raise ValueError(f"method {self.method} ranks tokens by {implied} attention: "
                             f"saliency_source must be {implied!r} (or unset)")
        if self.method == "fastgen" and self.saliency_source == "random":
            raise ValueError("fastgen ranks the tokens of its slots by normalized or accumulated "
                             "attention: saliency_source 'random' is not supported")
        fg = self.fastgen
        if fg is not None and fg.slots is not None:
            if fg.slots % 8 or fg.slots > self.block_size:
                raise ValueError(f"fastgen.slots must be a multiple of 8 and <= block_size "
                                 f"({self.block_size}), got {fg.slots}")
            if not fg.mixed and fg.kept_bits != 8:
                raise ValueError("paged fastgen (slots set) stores kept tokens at 8 bits or mixed "
                                 "precision: set kept_bits: 8 or mixed: true")
        if self.saliency_delay and (self.method == "fastgen" or not self.quantizes):
            raise ValueError(f"saliency_delay applies to quantizing methods, not to {self.method}")
        if fg is not None and fg.mixed and fg.slots is None:
            raise ValueError("fastgen.mixed needs fastgen.slots (mixed precision exists only in pages)")
        return self

    @property
    def n_salient(self) -> int:
        """Salient tokens per (block, KV head): round(salient_ratio * block_size); 0 for uniform."""
        if self.method == "kivi":
            return 0
        return int(round(self.salient_ratio * self.block_size))

    @property
    def staged_blocks(self) -> int:
        """Blocks a request stages at most: the one being filled and ``saliency_delay`` more."""
        return 1 + self.saliency_delay

    @property
    def quantizes(self) -> bool:
        return self.method not in NON_QUANTIZING_METHODS

    @property
    def paged_fastgen(self) -> bool:
        """A FastGen preset the engine serves (evicting into pages of ``fastgen.slots`` slots)."""
        return self.method == "fastgen" and self.fastgen is not None and self.fastgen.slots is not None


def user_config_dir() -> Path | None:
    """The folder of user presets named by ``ZIPCACHE_VLLM_CONFIG_DIR`` (None when unset, or
    when it names the built-in folder itself); a name that is not a folder is an error."""
    value = os.environ.get(USER_CONFIG_ENV, "")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise PresetError(f"{USER_CONFIG_ENV}={value} is not a folder (it names a folder of extra "
                          "preset YAML files, added to the built-in presets)")
    return None if path.resolve() == CONFIG_DIR.resolve() else path


def preset_files(config_dir: Path | None = None) -> dict[str, Path]:
    """``{preset name: YAML file}``: the built-in presets plus the user's
    (``ZIPCACHE_VLLM_CONFIG_DIR``), or only the presets in ``config_dir`` when it is given."""
    if config_dir is not None:
        return {p.stem: p for p in sorted(Path(config_dir).glob("*.yaml"))}
    return dict(_merged_preset_files(CONFIG_DIR, user_config_dir()))


@lru_cache(maxsize=None)
def _merged_preset_files(builtin_dir: Path, user_dir: Path | None) -> dict[str, Path]:
    files = {p.stem: p for p in sorted(builtin_dir.glob("*.yaml"))}
    if not files:
        raise PresetError(f"no built-in presets in {builtin_dir}: this zipcache_vllm install lacks its "
                          "package data (configs/); reinstall it from a wheel or a checkout built "
                          "with the repository's setup.py")
    for path in sorted(user_dir.glob("*.yaml")) if user_dir else ():
        builtin = files.get(path.stem)
        if builtin is None:
            files[path.stem] = path
        elif builtin.read_bytes() != path.read_bytes():
            raise PresetError(f"{path}: user preset {path.stem!r} ({USER_CONFIG_ENV}) has the name of a "
                              f"built-in preset ({builtin}) and differs from it; built-in presets "
                              "cannot be replaced: rename the file and its 'name:' field")
    return files


def list_presets(config_dir: Path | None = None) -> list[str]:
    """Names of the presets (file stems, see :func:`preset_files`), sorted."""
    return sorted(preset_files(config_dir))


def parse_preset(data: object, source: str) -> Preset:
    """Validate a preset mapping; errors name ``source``, the field and the allowed values."""
    if not isinstance(data, dict):
        raise PresetError(f"{source}: a preset must be a YAML mapping, got {type(data).__name__}")
    try:
        return Preset.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "(preset)"
            lines.append(f"  {field}: {err['msg']} (got {err.get('input')!r})")
        raise PresetError(f"invalid preset {source}:\n" + "\n".join(lines)) from None


def load_preset(name: str, config_dir: Path | None = None) -> Preset:
    """Load the preset ``name`` (see :func:`preset_files`); unknown names list the valid ones."""
    files = preset_files(config_dir)
    if name not in files:
        raise PresetError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(files))}")
    return _read_preset(name, files[name])


@lru_cache(maxsize=None)
def _read_preset(name: str, path: Path) -> Preset:
    user = os.environ.get(USER_CONFIG_ENV) or "unset"
    fix = (f"fix or remove {path} (presets are read from {CONFIG_DIR} and from the folder "
           f"{USER_CONFIG_ENV} names, now {user})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise PresetError(f"{path}: malformed YAML: {exc}\n{fix}") from None
    try:
        preset = parse_preset(data, str(path))
    except PresetError as exc:
        raise PresetError(f"{exc}\n{fix}") from None
    if preset.name != name:
        raise PresetError(f"{path}: name {preset.name!r} must match the file name {name!r}\n{fix}")
    return preset
