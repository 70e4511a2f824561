"""Cost of FastGen's profiling as a share of prefill time (``zipcache-vllm fastgen profile-cost``).

Profiling happens once per request, in its first step. The engine's step has
finished the chunk's attention (its log-sum-exp per query) when the FastGen policy
sees it (:meth:`~zipcache_vllm.policies.FastGenPolicy.observe_attention`); profiling
adds, per layer, the probe rows' attention mass over the chunk (one pass of the probe
queries over the keys, ``saliency.probe_mass``) and the hybrid ladder
(:meth:`~zipcache_vllm.policies.FastGenPolicy.profile_rungs`), plus classifying the
prompt's token ids once. This times exactly those calls on the real queries / keys of
every layer of a real prompt (the log-sum-exps are computed untimed, as the step's
attention computes them), against the model's whole prefill forward pass on the same
prompt (HF transformers, SDPA attention, same threads). Both are the minimum over
the repeats (the least disturbed run on a shared machine).
"""
from __future__ import annotations

import time

import torch


def _capture(model, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """Per layer: scaled queries ``[H, g, L, D]``, keys ``[H, L, D]``, and the softmax scale."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    got = []

    def hook(module, query, key, value, attention_mask=None, scaling=None, **kw):
        q, k = query[0].float(), key[0].float()  # [Hq, L, D], [Hk, L, D]
        hk = k.shape[0]
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        got.append(((q * scale).reshape(hk, q.shape[0] // hk, *q.shape[1:]), k.clone()))
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kw)

    AttentionInterface.register("zipcache_capture", hook)
    model.set_attn_implementation("zipcache_capture")
    with torch.inference_mode():
        model(input_ids=ids.unsqueeze(0), use_cache=False, logits_to_keep=1)
    model.set_attn_implementation("sdpa")
    return got


def measure(model, tok, model_dir: str, preset_name: str, prompt_len: int, repeats: int = 3) -> dict:
    from ..config import load_preset
    from ..eval.offline import token_windows_for
    from ..policies import make_policy
    from ..policies.token_classes import class_table, classify

    preset = load_preset(preset_name)
    policy = make_policy(preset)
    ids = torch.tensor(token_windows_for(tok, prompt_len, 1)[0])
    table = class_table(model_dir)
    layers = [(qs, k, _causal_lse(qs, k)) for qs, k in _capture(model, ids)]
    prefill, profile, rungs = [], [], None
    with torch.inference_mode():
        model(input_ids=ids.unsqueeze(0), use_cache=False, logits_to_keep=1)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(input_ids=ids.unsqueeze(0), use_cache=False, logits_to_keep=1)
            prefill.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            cls = classify(table, ids)
            rungs = [policy.profile_rungs(qs, k, lse, cls) for qs, k, lse in layers]
            profile.append(time.perf_counter() - t0)
    p, f = min(prefill), min(profile)
    hist = torch.bincount(torch.cat(rungs), minlength=5).tolist()
    return {"preset": preset_name, "prompt_len": prompt_len, "prefill_s": p, "profile_s": f,
            "share": f / p, "rung_histogram": hist, "probe_rows": _num_probes(prompt_len, policy)}


def _causal_lse(qs: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Log-sum-exp ``[H, g, L]`` of causal attention of scaled queries ``qs [H, g, L, D]``
    over ``k [H, L, D]``, from the step's own tiled attention (what it leaves for the
    profiling; the captured layers have no values, and the output is not used)."""
    from ..engine.attention import tiled_attention

    with torch.inference_mode():
        return tiled_attention(qs, k, k, 0, None)[1]


def _num_probes(n: int, policy) -> int:
    from ..saliency import probe_rows

    return int(probe_rows(n, policy.preset.probes, seed=0).numel())


def markdown(rows: list[dict], command: str, machine: str) -> str:
    from ..policies.fastgen_pages import HYBRID_NAMES

    names = list(HYBRID_NAMES)
    lines = [f"Command: `{command}`", "", f"Machine: {machine}", "",
             "| preset | prompt tokens | probe rows | prefill (s) | profiling (s) | share of prefill | "
             "heads per rung (" + ", ".join(names) + ") |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['prompt_len']} | {r['probe_rows']} | {r['prefill_s']:.3f} | "
                     f"{r['profile_s'] * 1e3:.1f} ms | {r['share']:.2%} | {r['rung_histogram']} |")
    return "\n".join(lines) + "\n"
