"""Offline quality harness: the embedded model in HF transformers with a simulated paged cache.

For each window of real text (``corpus.py``) the model runs once with an
uncompressed bf16 cache (the reference) and once per preset through
:class:`~zipcache_vllm.eval.simulate.KVSimulator`: the first ``prefill_len``
tokens as the prompt chunk, the rest block by block as decode would. Metrics
are taken over the positions after the prompt (the "generation"), where every
query reads a cache whose completed blocks are compressed:

* KL(reference || preset) of the next-token distributions (full vocabulary),
* top-1 agreement with the reference,
* perplexity of the real next tokens,
* bytes per token per KV head from the layout (all parameters counted), and
  the compression ratio vs bf16. Paged FastGen's bytes are its page bytes
  (docs/FASTGEN.md); offline-only FastGen's are its measured kept fraction
  times the bf16 bytes.
"""
from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass, field

import torch

from ..config import Preset, PresetError, load_preset
from ..layout import BF16_BYTES
from ..policies import FastGenPolicy, make_policy
from .simulate import KVSimulator, SimConfig

ATTN_NAME = "zipcache_sim"


@dataclass
class Variant:
    """One row of the table: a preset plus simulation settings."""

    label: str
    preset: Preset
    saliency_window: str = "block"
    note: str = ""

    def sim_config(self, prefill_len: int) -> SimConfig:
        """How the simulator runs this row: the prompt, then block by block (a block packed
        as the preset's ``saliency_delay`` says)."""
        return SimConfig(prefill_len, self.preset.block_size, self.saliency_window)


@dataclass
class Row:
    label: str
    note: str
    bytes_per_token: float
    compression: float
    kl: float
    top1: float
    ppl: float
    extra: dict = field(default_factory=dict)


def _variant(label: str, base: str, note: str = "", window: str = "block", **update) -> Variant:
    preset = load_preset(base)
    if update:
        probes = update.pop("probes", None)
        if probes:
            update["probes"] = preset.probes.model_copy(update=probes)
        preset = preset.model_copy(update=update)
    return Variant(label, preset, window, note)


def standard_variants() -> list[Variant]:
    """The presets of the main table."""
    names = ["kivi2", "kivi3", "kivi4", "h2o_mixed", "random_mixed", "zipcache", "zipcache_exact",
             "zipcache_hc", "fastgen_t90", "fastgen_t95", "fastgen_t98", "zipcache_fastgen", "zipcache_fastgen_hc",
             "fastgen_ideal_t95"]
    return [_variant(n, n, load_preset(n).description) for n in names]


def ablation_variants() -> list[Variant]:
    """The design ablations around the default preset."""
    return [
        _variant("abl:topk=sequence", "zipcache", "sequence-global top-k (paper) instead of block-local",
                 topk_scope="sequence"),
        _variant("abl:norm=l_minus_i", "zipcache", "probe scores divided by L - i (reference code)",
                 probes={"normalize": "l_minus_i"}),
        _variant("abl:probes=recent", "zipcache", "recent probes only (10%)",
                 probes={"strategy": "recent", "recent_frac": 0.10}),
        _variant("abl:probes=random", "zipcache", "random probes only (10%)",
                 probes={"strategy": "random", "random_frac": 0.10}),
        _variant("abl:window=chunk", "zipcache", "prompt blocks scored by probes of the whole prompt chunk",
                 window="chunk"),
        _variant("abl:exact+window=chunk", "zipcache_exact", "exact saliency over the whole prompt chunk",
                 window="chunk"),
        _variant("abl:oracle", "zipcache_exact", "exact normalized attention of ALL queries, future ones included "
                 "(offline upper bound)", window="oracle"),
        _variant("abl:delay=1", "zipcache", "a filled block packed one block later, scored by its own and "
                 "the next block's probes", saliency_delay=1),
        _variant("abl:delay=2", "zipcache", "packed two blocks later", saliency_delay=2),
        _variant("abl:exact+delay=1", "zipcache_exact", "exact saliency of the block's and the next block's "
                 "queries", saliency_delay=1),
        _variant("abl:uniform3+delay=1", "uniform3", "uniform 3-bit packed one block later (the delay's "
                 "longer 8-bit staging without saliency)", saliency_delay=1),
        _variant("abl:uniform3+delay=2", "uniform3", "uniform 3-bit packed two blocks later", saliency_delay=2),
        _variant("abl:hc+delay=1", "zipcache_hc", "the high-compression preset packed one block later",
                 saliency_delay=1),
        _variant("abl:uniform2+delay=1", "uniform2", "uniform 2-bit packed one block later", saliency_delay=1),
        _variant("abl:random+delay=1", "random_mixed", "random saliency packed one block later", saliency_delay=1),
        _variant("abl:ratio=0.6", "zipcache", "paper's 60% salient tokens (more bytes)", salient_ratio=0.6),
        _variant("abl:rotation=none", "zipcache", "keys stored unrotated (the paper's)", key_rotation="none"),
        _variant("abl:values=rotated", "zipcache", "values stored Hadamard-rotated too (same bytes)",
                 value_rotation="hadamard"),
        _variant("abl:staging=model", "zipcache", "staged tokens held in the model dtype, not 8 bits "
                 "(twice the staging blocks; issue 20)", staging_bits=None),
    ]


def named_variants(names: list[str]) -> list[Variant]:
    """Variants by name: a preset's name, or an ablation's label (``abl:...``)."""
    ablations = {v.label: v for v in ablation_variants()}
    out = []
    for n in names:
        if n.startswith("abl:"):
            if n not in ablations:
                raise PresetError(f"unknown ablation {n!r}; ablations: {', '.join(ablations)}")
            out.append(ablations[n])
        else:
            out.append(_variant(n, n, load_preset(n).description))
    return out


def _token_classes(tokenizer, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """bool ``[L]`` special and punctuation masks (FastGen)."""
    import string

    special_ids = set(tokenizer.all_special_ids)
    punct_chars = set(string.punctuation)
    special = torch.tensor([i in special_ids for i in ids])
    pieces = tokenizer.convert_ids_to_tokens(ids)
    punct = []
    for piece in pieces:
        text = tokenizer.convert_tokens_to_string([piece])
        punct.append(bool(text) and all(ch in punct_chars or ch.isspace() for ch in text))
    return special, torch.tensor(punct)


def load_model(model_dir: str):
    """The model in float32 with the simulator's attention hook name, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    return model, tok


@torch.inference_mode()
def simulated_logprobs(model, sim: KVSimulator, ids: torch.Tensor, start: int) -> torch.Tensor:
    """float32 log-probabilities ``[len(ids) - start - 1, vocab]`` of the HF model over
    ``ids``, its attention run through ``sim`` (a policy applied block by block, as the
    paged engine stores the cache): row ``i`` predicts the token at ``start + 1 + i``. A
    ``calibrated`` key rotation follows the model folder's calibration, as in the engine."""
    from transformers import AttentionInterface

    from ..calibration import rotated_layers

    if sim.rotated is None:
        sim.rotated = rotated_layers(getattr(model, "name_or_path", None) or None)
    AttentionInterface.register(ATTN_NAME, sim)
    return _logprobs(model, ATTN_NAME, ids, start)


@torch.inference_mode()
def reference_logprobs(model, ids: torch.Tensor, start: int) -> torch.Tensor:
    """:func:`simulated_logprobs` of the uncompressed cache, through the model's own fused
    attention (``sdpa``) instead of the simulator's block-by-block one: the same values up
    to float32 summation order, several times faster at long context."""
    return _logprobs(model, "sdpa", ids, start)


def _logprobs(model, attn_implementation: str, ids: torch.Tensor, start: int) -> torch.Tensor:
    """The model's float32 log-probabilities over ``ids`` from row ``start`` on, its attention
    run by ``attn_implementation``."""
    model.set_attn_implementation(attn_implementation)
    keep = ids.numel() - start
    out = model(input_ids=ids.unsqueeze(0), use_cache=False, logits_to_keep=keep).logits[0, :-1]
    return torch.log_softmax(out.float(), -1)


def evaluate(model, tok, variants: list[Variant], seq_len: int, prefill_len: int, num_windows: int,
             progress: bool = True) -> list[Row]:
    """Run every variant on ``num_windows`` windows; rows in the order given, reference first."""
    from tqdm.auto import tqdm

    cfg = model.config
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    windows = token_windows_for(tok, seq_len, num_windows)
    block = variants[0].preset.block_size if variants else 128
    none = make_policy("none")
    acc = {v.label: {"kl": 0.0, "top1": 0.0, "nll": 0.0, "n": 0, "kept": []} for v in variants}
    ref_nll, ref_n = 0.0, 0
    total = len(windows) * (len(variants) + 1)
    bar = tqdm(total=total, desc="offline eval", disable=not progress, unit="pass")
    for ids_list in windows:
        ids = torch.tensor(ids_list)
        special, punct = _token_classes(tok, ids_list)
        labels = ids[prefill_len + 1:]
        ref_sim = KVSimulator(none, SimConfig(prefill_len, block))
        ref = simulated_logprobs(model, ref_sim, ids, prefill_len)
        ref_nll += float(-ref.gather(-1, labels.unsqueeze(-1)).sum())
        ref_n += labels.numel()
        bar.update()
        for v in variants:
            sim = KVSimulator(make_policy(v.preset), v.sim_config(prefill_len))
            sim.reset(special, punct)
            lp = simulated_logprobs(model, sim, ids, prefill_len)
            a = acc[v.label]
            a["kl"] += float((ref.exp() * (ref - lp)).sum())
            a["top1"] += float((ref.argmax(-1) == lp.argmax(-1)).sum())
            a["nll"] += float(-lp.gather(-1, labels.unsqueeze(-1)).sum())
            a["n"] += labels.numel()
            if sim.stats.kept_fraction:
                a["kept"].append(sum(sim.stats.kept_fraction.values()) / len(sim.stats.kept_fraction))
            bar.set_postfix_str(v.label)
            bar.update()
    bar.close()
    bf16 = 2 * head * BF16_BYTES
    rows = [Row("none (bf16)", "reference", bf16, 1.0, 0.0, 1.0, math.exp(ref_nll / ref_n))]
    for v in variants:
        a = acc[v.label]
        policy = make_policy(v.preset)
        extra = {}
        if isinstance(policy, FastGenPolicy):
            kept = sum(a["kept"]) / len(a["kept"])
            extra["kept_fraction"] = kept
            # Paged FastGen: the page bytes (fixed slots per block) already count the eviction.
            nbytes = policy.bytes_per_token_per_head(head) * (1.0 if policy.paged else kept)
        else:
            nbytes = policy.bytes_per_token_per_head(head)
        rows.append(Row(v.label, v.note, nbytes, bf16 / nbytes, a["kl"] / a["n"], a["top1"] / a["n"],
                        math.exp(a["nll"] / a["n"]), extra))
    return rows


def token_windows_for(tok, seq_len: int, count: int) -> list[list[int]]:
    from .corpus import token_windows

    prefix = [tok.bos_token_id] if tok.bos_token_id is not None else []
    return token_windows(tok, seq_len, count, prefix)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| preset | bytes/token/KV head | compression vs bf16 | KL vs bf16 | top-1 agree | perplexity | notes |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        note = r.note
        if "kept_fraction" in r.extra:
            note = f"kept {r.extra['kept_fraction']:.1%}; " + note
        lines.append(f"| {r.label} | {r.bytes_per_token:.2f} | {r.compression:.2f}x | {r.kl:.5f} | "
                     f"{r.top1:.2%} | {r.ppl:.3f} | {note} |")
    return "\n".join(lines)


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import os

    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
