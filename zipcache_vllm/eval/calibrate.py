"""Measure a model's calibration (``zipcache_vllm/calibration.py``): per layer, whether
Hadamard-rotated keys lower the attention error of the default preset's pages.

Windows from the end of the project's corpus (``eval/corpus.py``, never evaluation text;
the quality evals' windows start at its beginning) run once through the HF model, uncompressed, capturing each layer's queries, keys and values.
Per layer, the simulator (``simulate.py``: the engine's block-by-block pages, 8-bit
staging, the layer's sliding window) stores them with keys rotated and unrotated; the
error is ``||o_hat - o||^2 / ||o||^2`` of the attention outputs after the first
``prompt_len`` tokens (they read earlier blocks packed). A layer rotates its keys when
that lowers its error summed over the windows.

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
    rotate = [r <= u for r, u in zip(errors[True], errors[False])]
    return {"version": VERSION, "preset": preset, "windows": windows, "seq_len": seq_len,
            "prompt_len": prompt_len,
            "corpus": f"the last {windows} x {seq_len} tokens of zipcache_vllm.eval.corpus",
            "key_rotation": {"rotate": rotate,
                             "error_rotated": [e / windows for e in errors[True]],
                             "error_unrotated": [e / windows for e in errors[False]]}}


def _tail_windows(tok, seq_len: int, count: int) -> list[list[int]]:
    """``count`` windows of ``seq_len`` tokens (the BOS token first when the model has one)
    from the last tokens of the corpus."""
    from .corpus import english_text

    prefix = [tok.bos_token_id] if tok.bos_token_id is not None else []
    body = seq_len - len(prefix)
    ids = tok(english_text(), add_special_tokens=False)["input_ids"][-count * body:]
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
