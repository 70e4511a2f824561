"""Paged FastGen through the real engine: capacity from its own log, logprobs vs the simulator.

* Capacity: the engine's "KV cache size: N tokens" line must equal what the page
  layout predicts: ``floor((budget - staging) / (layers * page_bytes)) * B``, and
  the same formula with the non-evicting page (all ``B`` tokens stored like the
  kept ones) gives the growth factor, ``~ B / S``.
* Fidelity: the float32 engine generates greedily with logprobs; the offline
  simulator (:mod:`.sim`) replays the same tokens with the same preset and token
  classes; |engine - simulator| is compared with |engine - uncompressed simulation|.
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import torch

from ..engine_proc import run_worker

KV_TOKENS = re.compile(r"KV cache size: ([\d,]+) tokens")


def run_engine(model_dir: str, kv_dtype: str, prompts: list[list[int]], max_tokens: int,
               dtype: str = "float32", kv_space_gib: int = 1, timeout: float = 1200) -> dict:
    """``eval.engine_gen`` in its own process; its JSON plus the engine's logged capacity."""
    with tempfile.TemporaryDirectory() as tmp:
        pfile, out = Path(tmp) / "prompts.json", Path(tmp) / "out.json"
        pfile.write_text(json.dumps(prompts))
        args = ["--model", model_dir, "--kv-cache-dtype", kv_dtype, "--dtype", dtype, "--prompts", str(pfile),
                "--out", str(out), "--max-tokens", str(max_tokens), "--kv-space-gib", str(kv_space_gib)]
        log = run_worker("zipcache_vllm.eval.engine_gen", args, Path(tmp) / "engine.log", f"engine run {kv_dtype}",
                         timeout)
        res = json.loads(out.read_text())
    m = KV_TOKENS.search(log)
    res["kv_tokens_logged"] = int(m.group(1).replace(",", "")) if m else None
    return res


def expected_capacity(preset_name: str, model_dir: str, budget_bytes: int, dtype: torch.dtype,
                      max_model_len: int = 2048) -> dict:
    """KV tokens the engine logs for the layout, with and without eviction (the planner's
    capacity: blocks over the blocks of a ``max_model_len`` request and its staging)."""
    from transformers import AutoConfig

    from ..config import load_preset
    from ..layout import BlockLayout, FastGenLayout, StagingLayout
    from ..planner import capacity as cap

    cfg = AutoConfig.from_pretrained(model_dir)
    L, H = cfg.num_hidden_layers, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    preset = load_preset(preset_name)
    lay = FastGenLayout.from_preset(preset, D, H)
    k = lay.kept
    no_evict = BlockLayout(lay.block_size, D, H, k.hi_bits, k.lo_bits,
                           int(round(k.n_hi * lay.block_size / lay.slots)))
    elt = torch.empty((), dtype=dtype).element_size()

    def tokens(layout) -> int:
        fmt = cap.PageFormat(preset_name, layout.block_size, H, D, layout.page_bytes, preset.name, layout,
                             StagingLayout.of(layout, elt, preset.staging_bits,
                                              preset.staged_blocks).lookahead_blocks)
        return cap.engine_capacity(fmt, [budget_bytes], [L], max_model_len).kv_tokens

    return {"tokens": tokens(lay), "tokens_no_eviction": tokens(no_evict), "page_bytes": lay.page_bytes,
            "page_bytes_no_eviction": no_evict.page_bytes, "slots": lay.slots, "block_size": lay.block_size}


@torch.inference_mode()
def simulated_logprobs(model, table: torch.Tensor, preset, prompt: list[int], gen: list[int]) -> list[float]:
    """Logprob of each generated token under the simulated cache of ``preset`` (name or Preset)."""
    from ..eval.offline import simulated_logprobs
    from ..eval.simulate import KVSimulator, SimConfig
    from ..policies import make_policy
    from ..policies.token_classes import classify, masks

    policy = make_policy(preset)
    sim = KVSimulator(policy, SimConfig(prefill_len=len(prompt), chunk_size=policy.preset.block_size))
    ids = torch.tensor(prompt + gen)
    sim.reset(*masks(classify(table, ids)))
    lp = simulated_logprobs(model, sim, ids, len(prompt) - 1)
    return lp.gather(-1, torch.tensor(gen).unsqueeze(-1)).squeeze(-1).tolist()


def check(model_dir: str, kv_dtype: str, num_prompts: int = 3, prompt_len: int = 600,
          max_tokens: int = 32, kv_space_gib: int = 1) -> dict:
    """One engine run of ``kv_dtype``: capacity vs layout, logprobs vs the simulator, greedy text."""
    from ..dtypes import preset_for_dtype
    from ..eval.fidelity import gap_stats
    from ..eval.offline import load_model, token_windows_for
    from ..policies.token_classes import class_table

    preset = preset_for_dtype(kv_dtype)
    model, tok = load_model(model_dir)
    chat = tok(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                       add_generation_prompt=True, tokenize=False),
               add_special_tokens=False)["input_ids"]
    prompts = token_windows_for(tok, prompt_len, num_prompts) + [chat]
    res = run_engine(model_dir, kv_dtype, prompts, max_tokens, kv_space_gib=kv_space_gib)
    table = class_table(model_dir)
    same, none = [], []
    for prompt, row in zip(prompts, res["rows"]):
        gen, elp = row["token_ids"], row["logprobs"]
        same += [abs(a - b) for a, b in zip(elp, simulated_logprobs(model, table, preset, prompt, gen))]
        none += [abs(a - b) for a, b in zip(elp, simulated_logprobs(model, table, "none", prompt, gen))]
    cap = expected_capacity(preset.name, model_dir, kv_space_gib * 2 ** 30, torch.float32)
    return {"kv_cache_dtype": kv_dtype, "preset": preset.name, "tokens": len(same),
            "vs_same_preset": gap_stats(same), "vs_uncompressed": gap_stats(none),
            "kv_tokens_logged": res["kv_tokens_logged"], "capacity": cap,
            "chat_answer": tok.decode(res["rows"][-1]["token_ids"])}


def markdown(results: list[dict], command: str, machine: str) -> str:
    lines = [f"Command: `{command}`", "", f"Machine: {machine}", "",
             "| --kv-cache-dtype | KV tokens (engine log) | layout prediction | without eviction | growth | "
             "\\|lp - sim\\| median | mean | \\|lp - uncompressed\\| mean |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        c, s, n = r["capacity"], r["vs_same_preset"], r["vs_uncompressed"]
        lines.append(f"| {r['kv_cache_dtype']} | {r['kv_tokens_logged']} | {c['tokens']} | {c['tokens_no_eviction']} | "
                     f"{r['kv_tokens_logged'] / c['tokens_no_eviction']:.3f}x (B/S = {c['block_size'] / c['slots']:.3f}) | "
                     f"{s['median']:.2e} | {s['mean']:.2e} | {n['mean']:.2e} |")
    lines.append("")
    for r in results:
        lines.append(f"Greedy answer with `{r['kv_cache_dtype']}` to \"What is the capital of France?\": "
                     f"`{r['chat_answer'][:120]!r}`")
    return "\n".join(lines) + "\n"
