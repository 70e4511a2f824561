"""Cost of FastGen's profiling as a share of prefill time (``zipcache-vllm fastgen profile-cost``).

Profiling happens once per request, in its first step. The engine's first step
materializes each query tile's attention probabilities anyway (no packed page yet,
so they are final); profiling adds, per layer, summing the probe rows of every tile
(:func:`~zipcache_vllm.engine.fastgen.probe_mass`) and the hybrid ladder
(:func:`~zipcache_vllm.engine.fastgen.rung_from_mass`), plus choosing the
probe rows and classifying the prompt's token ids once. This times exactly those
calls on the real queries / keys of every layer of a real prompt (the tiles are
rebuilt untimed, as the step builds them), against the model's whole prefill forward
pass on the same prompt (HF transformers, SDPA attention, same threads). Both are the
minimum over the repeats (the least disturbed run on a shared machine).
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
    from ..saliency import probe_rows
    from ..engine.attention import QUERY_TILE
    from ..engine.fastgen import probe_mass, rung_from_mass
    from ..policies import make_policy
    from ..engine.token_classes import class_table, classify

    preset = load_preset(preset_name)
    policy = make_policy(preset)
    ids = torch.tensor(token_windows_for(tok, prompt_len, 1)[0])
    table = class_table(model_dir)
    layers = _capture(model, ids)
    L = ids.numel()
    kidx = torch.arange(L)
    prefill, profile, rungs = [], [], None
    with torch.inference_mode():
        model(input_ids=ids.unsqueeze(0), use_cache=False, logits_to_keep=1)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(input_ids=ids.unsqueeze(0), use_cache=False, logits_to_keep=1)
            prefill.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            cls = classify(table, ids)
            probe = torch.zeros(L, dtype=torch.bool)
            probe[probe_rows(L, policy.preset.probes, seed=0)] = True
            spent = time.perf_counter() - t0
            rungs = []
            for qs, k in layers:
                acc = torch.zeros(k.shape[0], L)
                for r0 in range(0, L, QUERY_TILE):  # the step's tiles (untimed: attention computes them)
                    r1 = min(r0 + QUERY_TILE, L)
                    sc = torch.einsum("hgqd,htd->hgqt", qs[:, :, r0:r1], k)
                    sc = sc.masked_fill(kidx.unsqueeze(0) > kidx[r0:r1].unsqueeze(1), float("-inf"))
                    pt = torch.exp(sc - torch.logsumexp(sc, -1, keepdim=True))
                    t0 = time.perf_counter()
                    acc += probe_mass(pt, probe[r0:r1])
                    spent += time.perf_counter() - t0
                t0 = time.perf_counter()
                rungs.append(rung_from_mass(acc, cls, preset.fastgen))
                spent += time.perf_counter() - t0
            profile.append(spent)
    p, f = min(prefill), min(profile)
    hist = torch.bincount(torch.cat(rungs), minlength=5).tolist()
    return {"preset": preset_name, "prompt_len": prompt_len, "prefill_s": p, "profile_s": f,
            "share": f / p, "rung_histogram": hist, "probe_rows": _num_probes(prompt_len, policy)}


def _num_probes(n: int, policy) -> int:
    from ..saliency import probe_rows

    return int(probe_rows(n, policy.preset.probes, seed=0).numel())


def markdown(rows: list[dict], command: str, machine: str) -> str:
    from ..engine.fastgen_pages import HYBRID

    names = ["+".join(p) for p in HYBRID]
    lines = [f"Command: `{command}`", "", f"Machine: {machine}", "",
             "| preset | prompt tokens | probe rows | prefill (s) | profiling (s) | share of prefill | "
             "heads per rung (" + ", ".join(names) + ") |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['prompt_len']} | {r['probe_rows']} | {r['prefill_s']:.3f} | "
                     f"{r['profile_s'] * 1e3:.1f} ms | {r['share']:.2%} | {r['rung_histogram']} |")
    return "\n".join(lines) + "\n"
