"""The numbers of a model that capacity planning needs, read from its HF ``config.json``.

``load_model_spec`` takes a Hugging Face model folder, a ``config.json`` file, or the name
of a bundled architecture in ``configs/models/`` (``llama3_8b``, ``llama3_1_8b``). Nothing is
downloaded. KV sizes follow vLLM's reading of the config (``num_key_value_heads`` defaults to
``num_attention_heads``, ``head_dim`` defaults to ``hidden_size // num_attention_heads``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from ..config import CONFIG_DIR

MODELS_DIR = CONFIG_DIR / "models"
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}


class ModelSpecError(ValueError):
    """A model config that is missing, unreadable or unsupported by the planner."""


@dataclass(frozen=True)
class ModelSpec:
    """Architecture numbers of a decoder-only transformer (whole model, before parallelism)."""

    name: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_size: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    dtype: str
    max_position_embeddings: int | None
    attention_bias: bool = False
    rope_factor: float = 1.0  # RoPE scaling factor vLLM multiplies max_position_embeddings by
    # Each layer's sliding window in tokens (None: full attention); None: every layer full.
    layer_windows: tuple[int | None, ...] | None = None

    @property
    def is_hybrid(self) -> bool:
        """Layers of more than one attention type (Gemma 2/3: sliding windows and full)."""
        return self.layer_windows is not None and len(set(self.layer_windows)) > 1

    @property
    def derived_max_model_len(self) -> int | None:
        """The longest ``--max-model-len`` vLLM accepts without ``VLLM_ALLOW_LONG_MAX_MODEL_LEN``
        (``vllm.config.model._get_and_verify_max_len``; None when the config gives no length)."""
        if self.max_position_embeddings is None:
            return None
        return int(self.max_position_embeddings * self.rope_factor)

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def num_parameters(self) -> int:
        """Parameters of a dense Llama-style model (gated MLP, RMSNorm), embeddings included."""
        H, D = self.hidden_size, self.head_size
        attn = H * self.num_attention_heads * D * 2 + H * self.num_kv_heads * D * 2
        if self.attention_bias:
            attn += (self.num_attention_heads + 2 * self.num_kv_heads) * D
        per_layer = attn + 3 * H * self.intermediate_size + 2 * H
        embed = self.vocab_size * H
        lm_head = 0 if self.tie_word_embeddings else embed
        return self.num_layers * per_layer + embed + lm_head + H


def bundled_models() -> list[str]:
    """Names of the architectures shipped in ``configs/models/``."""
    return sorted(p.stem for p in MODELS_DIR.glob("*.json"))


def _config_path(model: str | Path) -> Path:
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    elif not path.exists() and (MODELS_DIR / f"{model}.json").is_file():
        path = MODELS_DIR / f"{model}.json"
    if not path.is_file():
        raise ModelSpecError(f"no model config at {model!r}: give an HF model folder, a config.json, "
                             f"or a bundled name ({', '.join(bundled_models())})")
    return path


# RoPE types whose max_position_embeddings is already the scaled length: vLLM does not
# multiply it by the factor (vllm.config.model._get_and_verify_max_len).
PRESCALED_ROPE_TYPES = ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")


def _rope_factor(cfg: dict) -> float:
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind in PRESCALED_ROPE_TYPES:
        return 1.0
    return float(rope.get("factor") or 1.0)


def spec_from_config(cfg: dict, name: str = "model") -> ModelSpec:
    """A :class:`ModelSpec` from a parsed ``config.json`` mapping."""
    cfg = cfg.get("text_config", cfg)
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if cfg.get(key):
            raise ModelSpecError(f"{name}: mixture-of-experts models ({key}={cfg[key]}) are not "
                                 "supported by the weights estimate; pass the weights size explicitly")
    if cfg.get("kv_lora_rank"):
        raise ModelSpecError(f"{name}: MLA models are not supported by zipcache")
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        spec = ModelSpec(
            name=name,
            num_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_size=int(cfg.get("head_dim") or hidden // heads),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
            max_position_embeddings=cfg.get("max_position_embeddings"),
            attention_bias=bool(cfg.get("attention_bias", False)),
            rope_factor=_rope_factor(cfg),
        )
    except KeyError as exc:
        raise ModelSpecError(f"{name}: config has no {exc.args[0]!r}") from None
    if spec.dtype not in DTYPE_BYTES:
        raise ModelSpecError(f"{name}: unsupported dtype {spec.dtype!r} ({', '.join(DTYPE_BYTES)})")
    windows = _layer_windows(cfg, spec.num_layers, name)
    return spec if windows is None else replace(spec, layer_windows=windows)


def _layer_windows(cfg: dict, num_layers: int, name: str) -> tuple[int | None, ...] | None:
    """Each layer's sliding window as vLLM reads the config: ``layer_types`` (Gemma 2/3, gpt-oss:
    ``sliding_attention`` layers get ``sliding_window``), else one window for every layer
    (Mistral: ``sliding_window``, unless ``use_sliding_window`` is false); None: no window."""
    window = cfg.get("sliding_window")
    if not window or not cfg.get("use_sliding_window", True):
        return None
    types = cfg.get("layer_types")
    if types is None:
        return (int(window),) * num_layers
    if len(types) != num_layers:
        raise ModelSpecError(f"{name}: layer_types lists {len(types)} layers, the model has {num_layers}")
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise ModelSpecError(f"{name}: layer types {unknown} are not supported by the planner")
    return tuple(int(window) if t == "sliding_attention" else None for t in types)


def load_model_spec(model: str | Path) -> ModelSpec:
    """Read a model folder, a ``config.json`` or a bundled architecture name."""
    path = _config_path(model)
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelSpecError(f"{path}: not valid JSON: {exc}") from None
    name = path.parent.name if path.name == "config.json" else path.stem
    return spec_from_config(cfg, name)
