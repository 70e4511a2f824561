"""A tiny randomly initialized Llama with head size 128 and GQA 4:1, built from a config
(no weights to download): 2 layers, 8 query heads and 2 KV heads of size 128, hidden size
256, the default model's tokenizer. It proves the engine path at the head size of most
served models (Llama, Mistral, Qwen), which SmolLM2 (64) does not exercise.

Weights: float32, normal with std ``INIT_STD``, seeded. The std is larger than a trained
model's initializer (0.02) so that attention is peaked rather than uniform: a near-uniform
attention would make saliency a field of near-ties that float32 summation order decides.
"""
from __future__ import annotations

import shutil
from pathlib import Path

INIT_STD = 0.08
SEED = 0
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def build_tiny_llama(out: Path, tokenizer_from: Path) -> Path:
    """Write the model (config.json, model.safetensors, tokenizer) to ``out``; returns ``out``."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(tokenizer_from)  # vocab, special ids and RoPE of the tokenizer's model
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 256, 512, 2
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 8, 2, 128
    cfg.max_position_embeddings, cfg.initializer_range = 4096, INIT_STD
    cfg.dtype = "float32"
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(Path(tokenizer_from) / name, out / name)
    return out
