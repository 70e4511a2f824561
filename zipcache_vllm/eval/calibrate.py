"""Measure a model's calibration (``zipcache_vllm/calibration.py``): per layer, whether
Hadamard-rotated keys lower the attention error of the default preset's pages.

Windows of the corpus's held-out end (``corpus.calibration_text``: no evaluation, benchmark
or test reads it) run once through the HF model, uncompressed, capturing each layer's
queries, keys and values.
Per layer, the simulator (``simulate.py``: the engine's block-by-block pages, 8-bit
staging, the layer's sliding window) stores them with keys rotated and unrotated; the
error is ``||o_hat - o||^2 / ||o||^2`` of the attention outputs after the first
``prompt_len`` tokens (they read earlier blocks packed). A layer keeps its keys unrotated
only where rotation at least doubles that error (``UNROTATED_BELOW``); everywhere else
they rotate. Rotation is the default because it protects retrieval, which an average
error over prose does not see: calibrated on the plain comparison (rotate where it lowers
the error at all), SmolLM2 rotated 13 of 30 layers and lost the passkey at depth 0.8 of
an 8k prompt, offline and through the engine, while rotating all but the 2 layers that
rotation clearly hurts found it (docs/RESULTS.md, "Key rotation per layer"). Near ties
also flip with the text; the clear cases (Gemma's full-attention layers) do not.

    zipcache-vllm model calibrate [--model smollm2|gemma3-270m|DIR]
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..calibration import FILE_NAME, VERSION, calibration_path
from ..config import load_preset
from ..policies import make_policy
from .simulate import KVSimulator, SimConfig

WINDOWS = 2
SEQ_LEN = 1024
PROMPT_LEN = 512
PRESET = "zipcache"
#: A layer's keys stay unrotated when its unrotated error is below this fraction of its
#: rotated error (rotation at least doubles it).
UNROTATED_BELOW = 0.5


class _Capture(KVSimulator):
    """The uncompressed attention, keeping each layer's q, k, v, scale and window."""

    def __init__(self) -> None:
        super().__init__(make_policy("none"), SimConfig(0, 128))
        self.layers: dict[int, tuple] = {}

    def __call__(self, module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                 sliding_window=None, **kw):
        self.layers[module.layer_idx] = (query[0].float(), key[0].float(), value[0].float(),
                                         scaling, sliding_window)
        return super().__call__(module, query, key, value, attention_mask, scaling, dropout,
                                sliding_window=sliding_window, **kw)


class _Layer:
    layer_idx = 0


def _error(preset, q, k, v, scale, window, ref, prompt_len: int) -> float:
    sim = KVSimulator(make_policy(preset), SimConfig(prefill_len=0, chunk_size=preset.block_size))
    out, _ = sim(_Layer(), q[None], k[None], v[None], scaling=scale, sliding_window=window)
    d = out[0, prompt_len:] - ref[0, prompt_len:]  # [L, Hq, D]: the positions after the prompt
    return float(d.pow(2).sum() / ref[0, prompt_len:].pow(2).sum().clamp(min=1e-30))


@torch.inference_mode()
def measure(model_dir: str, windows: int = WINDOWS, seq_len: int = SEQ_LEN,
            prompt_len: int = PROMPT_LEN, preset: str = PRESET, progress: bool = True) -> dict:
    """The calibration of ``model_dir`` (what :func:`calibrate` writes)."""
    from transformers import AttentionInterface
    from tqdm.auto import tqdm

    from .offline import load_model

    model, tok = load_model(model_dir)
    capture = _Capture()
    AttentionInterface.register("zipcache_calibrate", capture)
    model.set_attn_implementation("zipcache_calibrate")
    base = load_preset(preset)
    variants = {flag: base.model_copy(update={"key_rotation": "hadamard" if flag else "none"})
                for flag in (True, False)}
    none = make_policy("none")
    errors: dict[bool, list[float]] = {True: [], False: []}
    for w, ids in enumerate(tqdm(_tail_windows(tok, seq_len, windows), desc="calibrate",
                                 unit="window", disable=not progress)):
        capture.layers.clear()
        model(input_ids=torch.tensor([ids]), use_cache=False, logits_to_keep=1)
        for layer in sorted(capture.layers):
            q, k, v, scale, window = capture.layers[layer]
            ref, _ = KVSimulator(none, SimConfig(0, base.block_size))(
                _Layer(), q[None], k[None], v[None], scaling=scale, sliding_window=window)
            for flag, p in variants.items():
                e = _error(p, q, k, v, scale, window, ref, prompt_len)
                if w == 0:
                    errors[flag].append(e)
                else:
                    errors[flag][layer] += e
    rotate = [not u < UNROTATED_BELOW * r for r, u in zip(errors[True], errors[False])]
    return {"version": VERSION, "preset": preset, "windows": windows, "seq_len": seq_len,
            "prompt_len": prompt_len, "unrotated_below": UNROTATED_BELOW,
            "corpus": f"{windows} x {seq_len} tokens of zipcache_vllm.eval.corpus.calibration_text",
            "key_rotation": {"rotate": rotate,
                             "error_rotated": [e / windows for e in errors[True]],
                             "error_unrotated": [e / windows for e in errors[False]]}}


def _tail_windows(tok, seq_len: int, count: int) -> list[list[int]]:
    """``count`` windows of ``seq_len`` tokens (the BOS token first when the model has one)
    of the held-out calibration text."""
    from .corpus import calibration_text

    prefix = [tok.bos_token_id] if tok.bos_token_id is not None else []
    body = seq_len - len(prefix)
    ids = tok(calibration_text(), add_special_tokens=False)["input_ids"]
    if len(ids) < count * body:
        raise ValueError(f"the calibration text has {len(ids)} tokens: too few for {count} x {seq_len}")
    return [prefix + ids[i * body:(i + 1) * body] for i in range(count)]


def calibrate(model_dir: str | Path, progress: bool = True) -> Path:
    """Measure and write ``model_dir/zipcache_calibration.json``; returns its path."""
    t0 = time.monotonic()
    data = measure(str(model_dir), progress=progress)
    data["seconds"] = round(time.monotonic() - t0, 1)
    path = calibration_path(model_dir)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
    return path


__all__ = ["FILE_NAME", "calibrate", "measure"]
