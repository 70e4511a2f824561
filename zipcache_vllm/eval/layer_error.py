"""Per-layer attention-output error of a compressed prompt (diagnostic behind docs/RESULTS.md).

One window of real text runs through the model once (uncompressed) to capture
each layer's queries, keys and values. Then, per layer, the prompt's complete
blocks are compressed and the relative error of the attention output of the
queries after the prompt is measured:
``||o_hat - o||^2 / ||o||^2`` with ``o`` the uncompressed output. Compared:
uniform 3-bit (kivi3), the 4/2 mix with probe saliency (the preset), and the
same mix with oracle saliency (the attention those later queries really pay).
"""
from __future__ import annotations

import torch

from ..config import load_preset
from ..policies import make_policy
from ..quant.block import topk_salient_mask
from ..quant.masked import fake_quantize_masked
from ..saliency import gqa_aggregate, probe_rows
from .simulate import KVSimulator, SimConfig


class _Capture(KVSimulator):
    def __init__(self, store: dict):
        super().__init__(make_policy("none"), SimConfig(0, 128))
        self.store = store

    def __call__(self, module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kw):
        self.store[module.layer_idx] = (query[0].float(), key[0].float(), value[0].float())
        return super().__call__(module, query, key, value, attention_mask, scaling, dropout, **kw)


def _attn(q, k, v, qpos, scale):
    g = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
    logits = torch.einsum("hqd,hkd->hqk", q, k) * scale
    logits = logits.masked_fill(torch.arange(k.shape[1])[None, :] > qpos[:, None], float("-inf"))
    p = torch.softmax(logits, -1)
    return torch.einsum("hqk,hkd->hqd", p, v), p


@torch.inference_mode()
def layer_errors(model, tok, seq_len: int = 512, prompt_len: int = 256, preset: str = "zipcache") -> dict:
    from .offline import simulated_logprobs, token_windows_for

    store: dict = {}
    ids = torch.tensor(token_windows_for(tok, seq_len, 1)[0])
    simulated_logprobs(model, _Capture(store), ids, seq_len - 1)
    pol = make_policy(load_preset(preset))
    B, n_hi = pol.preset.block_size, pol.preset.n_salient
    nb = prompt_len // B
    P = nb * B
    rows = {"kivi3": [], "mix_probes": [], "mix_oracle": []}
    for layer in sorted(store):
        q, k, v = store[layer]
        hk, D = k.shape[0], k.shape[-1]
        scale = D ** -0.5
        qpos = torch.arange(P, q.shape[1])
        o, p_dec = _attn(q[:, P:], k, v, qpos, scale)
        _, p_pre = _attn(q[:, :P], k[:, :P], v[:, :P], torch.arange(P), scale)
        oracle = gqa_aggregate(p_dec[:, :, :P].sum(1), hk)
        kb = k[:, :P].transpose(0, 1).reshape(nb, B, hk, D)
        vb = v[:, :P].transpose(0, 1).reshape(nb, B, hk, D)
        probes, orc = [], []
        for j in range(nb):
            r = probe_rows(B, pol.preset.probes, seed=j * B) + j * B
            kp = torch.arange(j * B, (j + 1) * B)
            probes.append(pol.rank_from_probs(p_pre[:, r][:, :, j * B:(j + 1) * B], r, kp, hk, (j + 1) * B, j * B))
            orc.append(oracle[:, j * B:(j + 1) * B])
        masks = {"kivi3": (torch.zeros(nb, hk, B, dtype=torch.bool), 3, 3),
                 "mix_probes": (topk_salient_mask(torch.stack(probes), n_hi), pol.preset.hi_bits, pol.preset.lo_bits),
                 "mix_oracle": (topk_salient_mask(torch.stack(orc), n_hi), pol.preset.hi_bits, pol.preset.lo_bits)}
        for name, (m, hb, lb) in masks.items():
            kh, vh = fake_quantize_masked(kb, vb, m, hb, lb)
            k2, v2 = k.clone(), v.clone()
            k2[:, :P] = kh.reshape(P, hk, D).transpose(0, 1)
            v2[:, :P] = vh.reshape(P, hk, D).transpose(0, 1)
            oh, _ = _attn(q[:, P:], k2, v2, qpos, scale)
            rows[name].append(float(((oh - o) ** 2).sum() / (o ** 2).sum()))
    return rows


def markdown(rows: dict, command: str) -> str:
    names = list(rows)
    out = [f"Command: `{command}`", "", "| layer | " + " | ".join(names) + " |",
           "| ---: | " + " | ".join("---:" for _ in names) + " |"]
    for i in range(len(rows[names[0]])):
        out.append(f"| {i} | " + " | ".join(f"{rows[n][i]:.4f}" for n in names) + " |")
    out.append("| mean | " + " | ".join(f"{sum(rows[n]) / len(rows[n]):.4f}" for n in names) + " |")
    better = sum(a < b for a, b in zip(rows["mix_probes"], rows["kivi3"]))
    worse = sum(a > b for a, b in zip(rows["mix_probes"], rows["kivi3"]))
    out += ["", f"mix_probes below kivi3 in {better} layers, above in {worse} "
            f"(rest equal to 4 decimals: {len(rows['kivi3']) - better - worse})."]
    return "\n".join(out) + "\n"
