"""A model's calibration: which layers store their keys Hadamard-rotated.

Rotating keys before their per-channel quantization spreads a few outlier channels over
all of them. Measured per layer on held-out text, that lowers the attention error in
some layers and raises it in others: on Gemma 3 270M its three full-attention layers
(RoPE base 1M: near-constant, large key channels) go from a relative output error of
0.04-0.10 unrotated to 0.09-2.1 rotated; on SmolLM2 the layers with the largest errors
gain 1.35x-2.7x and most others are near ties. Rotation also protects retrieval, which
an average error does not see, so a layer keeps its keys unrotated only where rotation
at least doubles its error (``docs/RESULTS.md``, "Key rotation per layer").

A preset with ``key_rotation: calibrated`` (the default ``zipcache`` preset and the fair
uniform baselines) rotates the keys of the layers the model's calibration file
(:data:`FILE_NAME` in the model folder, written by ``zipcache-vllm model calibrate``,
which ``model prepare`` runs for the bundled models) marks, and of every layer of a model
without one. The page bytes are the same either way. This module only reads the file
(import-light: the vLLM backend reads it at startup); ``eval/calibrate.py`` measures it.
"""
from __future__ import annotations

import json
from pathlib import Path

from .config import Preset

FILE_NAME = "zipcache_calibration.json"
VERSION = 1


def calibration_path(model_dir: str | Path) -> Path:
    return Path(model_dir) / FILE_NAME


def rotated_layers(model_dir: str | Path | None) -> list[bool] | None:
    """Per model layer, whether its keys are stored rotated (None: no calibration)."""
    if model_dir is None:
        return None
    path = calibration_path(model_dir)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("version") != VERSION:
        raise ValueError(f"{path}: calibration version {data.get('version')}, expected {VERSION}: "
                         "run `zipcache-vllm model calibrate` again")
    return [bool(x) for x in data["key_rotation"]["rotate"]]


def layer_preset(preset: Preset, rotated: list[bool] | None, layer: int) -> Preset:
    """``preset`` as layer ``layer`` stores it: a ``calibrated`` key rotation resolved from
    ``rotated`` (hadamard when the model has no calibration); other presets unchanged."""
    if preset.key_rotation != "calibrated":
        return preset
    rotate = True if rotated is None else rotated[layer]
    return preset.model_copy(update={"key_rotation": "hadamard" if rotate else "none"})


__all__ = ["FILE_NAME", "VERSION", "calibration_path", "layer_preset", "rotated_layers"]
