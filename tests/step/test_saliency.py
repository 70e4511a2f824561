"""Saliency scores against brute-force Python loops over small causal attention matrices.

ZipCache's normalized attention: ``p~_i = sum_k A[k, i] / nnz(A[:, i])`` where
nnz counts the queries that *can* see token i (causal), not the non-zero
probabilities. With probes, only probe rows are summed and counted. GQA: one
score per KV head, the sum over the query heads of its group (query head q
belongs to KV head ``q // (Hq / Hk)``, the HF / vLLM convention).
"""
from __future__ import annotations

import math

import pytest
import torch

from zipcache_vllm.config import ProbeConfig
from zipcache_vllm.saliency import (
    accumulated_scores,
    exact_normalized_attention,
    gqa_aggregate,
    normalized_scores,
    probe_rows,
    visible_counts,
)

# GQA ratios, including the awkward 9:3 and MQA
GQA = [(1, 1), (4, 4), (8, 1), (9, 3), (32, 8)]
ATOL = 1e-6  # float32 sums of at most a few dozen probabilities in [0, 1]


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def causal_attention(h: int, L: int, seed: int, start: int = 0) -> torch.Tensor:
    """``[h, L, L]`` softmax rows over keys ``0..L-1`` for queries at positions ``start..``."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(h, L, L, generator=g) * 3
    q = torch.arange(L).unsqueeze(1)
    k = torch.arange(L).unsqueeze(0)
    return torch.softmax(logits.masked_fill(k > q, float("-inf")), dim=-1)


def brute_normalized(attn: list, rows: list[int], row_pos: list[int], key_pos: list[int]) -> list[float]:
    """Per key i: sum of attn[r][i] over probe rows r, / number of probe rows whose position >= key_pos[i]."""
    out = []
    for i, kp in enumerate(key_pos):
        total, count = 0.0, 0
        for r, rp in zip(rows, row_pos):
            if rp >= kp:
                total += attn[r][i]
                count += 1
        out.append(total / max(count, 1))
    return out


@pytest.mark.parametrize("L", [1, 5, 16, 33])
def test_exact_normalized_attention_matches_loop(L):
    attn = causal_attention(3, L, seed=L)
    got = exact_normalized_attention(attn)
    assert got.shape == (3, L)
    for h in range(3):
        expected = brute_normalized(attn[h].tolist(), list(range(L)), list(range(L)), list(range(L)))
        torch.testing.assert_close(got[h], torch.tensor(expected), atol=ATOL, rtol=0)


def test_count_is_causal_not_nonzero():
    """A visible key whose probability underflowed to 0 still counts in the denominator."""
    L = 4
    attn = torch.zeros(L, L)
    attn[:, 0] = 1.0  # every query attends only to token 0: tokens 1..3 get exact zeros
    got = exact_normalized_attention(attn.unsqueeze(0))[0]
    assert got.tolist() == [1.0, 0.0, 0.0, 0.0]
    probs = attn[[1, 3]].unsqueeze(0)  # probes at positions 1 and 3
    s = normalized_scores(probs, torch.tensor([1, 3]), torch.arange(L), num_kv_heads=1)
    assert s.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    # token 0 is seen by 2 probes, token 2 by 1 (position 3), token 3 by 1
    assert visible_counts(torch.tensor([1, 3]), torch.arange(L)).tolist() == [2, 2, 1, 1]


@pytest.mark.parametrize("hq,hk", GQA)
@pytest.mark.parametrize("L,probes", [(12, [11]), (12, [0, 5, 11]), (20, [3, 4, 17, 18, 19]),
                                      (9, list(range(9)))])
def test_normalized_scores_with_probes_match_loop(hq, hk, L, probes):
    attn = causal_attention(hq, L, seed=hq * 100 + L)
    probs = attn[:, probes]  # [Hq, P, W]
    pos = torch.tensor(probes)
    got = normalized_scores(probs, pos, torch.arange(L), num_kv_heads=hk)
    assert got.shape == (hk, L) and got.dtype == torch.float32
    r = hq // hk
    for g in range(hk):
        expected = [0.0] * L
        for q in range(g * r, (g + 1) * r):  # the query heads of KV group g
            per_head = brute_normalized(attn[q].tolist(), probes, probes, list(range(L)))
            expected = [a + b for a, b in zip(expected, per_head)]
        torch.testing.assert_close(got[g], torch.tensor(expected), atol=ATOL * r, rtol=0)


def test_normalized_scores_of_an_offset_window():
    """Keys of a later block (positions 32..47) scored by probes at absolute positions."""
    L, start, W = 48, 32, 16
    attn = causal_attention(2, L, seed=1)
    probes = [35, 40, 47]
    probs = attn[:, probes, start:start + W]
    key_pos = torch.arange(start, start + W)
    got = normalized_scores(probs, torch.tensor(probes), key_pos, num_kv_heads=2)
    for h in range(2):
        window = [row[start:start + W] for row in attn[h].tolist()]
        expected = brute_normalized(window, probes, probes, key_pos.tolist())
        torch.testing.assert_close(got[h], torch.tensor(expected), atol=ATOL, rtol=0)
    # keys after the last probe are seen by nobody: score 0, not NaN
    assert torch.isfinite(got).all()


def test_all_rows_as_probes_equals_exact():
    L = 24
    attn = causal_attention(4, L, seed=2)
    got = normalized_scores(attn, torch.arange(L), torch.arange(L), num_kv_heads=4)
    torch.testing.assert_close(got, exact_normalized_attention(attn), atol=ATOL, rtol=0)


def test_l_minus_i_normalization_matches_loop():
    L = 16
    attn = causal_attention(1, L, seed=3)
    probes = [2, 9, 15]
    got = normalized_scores(attn[:, probes], torch.tensor(probes), torch.arange(L), 1, normalize="l_minus_i")
    expected = [sum(attn[0, p, i].item() for p in probes) / (L - i) for i in range(L)]
    torch.testing.assert_close(got[0], torch.tensor(expected), atol=ATOL, rtol=0)
    got_end = normalized_scores(attn[:, probes], torch.tensor(probes), torch.arange(L), 1,
                                normalize="l_minus_i", window_end=40)
    expected = [sum(attn[0, p, i].item() for p in probes) / (40 - i) for i in range(L)]
    torch.testing.assert_close(got_end[0], torch.tensor(expected), atol=ATOL, rtol=0)


def test_unknown_normalization_raises():
    with pytest.raises(ValueError, match="normalize must be"):
        normalized_scores(torch.zeros(1, 1, 4), torch.tensor([3]), torch.arange(4), 1, normalize="sum")


@pytest.mark.parametrize("hq,hk", GQA)
def test_gqa_aggregate_sums_query_heads_of_each_group(hq, hk):
    g = torch.Generator().manual_seed(hq)
    x = torch.rand(hq, 5, 7, generator=g)
    got = gqa_aggregate(x, hk)
    assert got.shape == (hk, 5, 7)
    r = hq // hk
    for kv in range(hk):
        expected = sum(x[q] for q in range(hq) if q // r == kv)
        torch.testing.assert_close(got[kv], expected, atol=ATOL * r, rtol=0)


@pytest.mark.parametrize("hq,hk", [(8, 3), (9, 2), (3, 9)])
def test_gqa_aggregate_rejects_uneven_groups(hq, hk):
    with pytest.raises(ValueError, match="not a multiple"):
        gqa_aggregate(torch.zeros(hq, 4), hk)


def test_accumulated_scores_match_loop():
    L = 10
    attn = causal_attention(6, L, seed=4)
    got = accumulated_scores(attn, num_kv_heads=2)
    for kv in range(2):
        expected = [sum(attn[q, k, i].item() for q in range(kv * 3, kv * 3 + 3) for k in range(L))
                    for i in range(L)]
        torch.testing.assert_close(got[kv], torch.tensor(expected), atol=1e-5, rtol=0)


# --- probe selection -----------------------------------------------------------------------


def expected_probe_count(W: int, cfg: ProbeConfig) -> int:
    if cfg.strategy == "exact":
        return W
    n_r = math.ceil(cfg.recent_frac * W) if cfg.strategy in ("recent", "recent_random") else 0
    n_d = math.ceil(cfg.random_frac * W) if cfg.strategy in ("random", "recent_random") else 0
    return min(W, max(cfg.min_probes, n_r + n_d))


CONFIGS = [
    ProbeConfig(),
    ProbeConfig(strategy="recent_random", recent_frac=0.1, random_frac=0.2, seed=7),
    ProbeConfig(strategy="recent", recent_frac=0.25),
    ProbeConfig(strategy="random", random_frac=0.1, seed=3),
    ProbeConfig(strategy="recent_random", recent_frac=0.0, random_frac=0.0, min_probes=6),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.strategy}-{c.recent_frac}-{c.random_frac}")
@pytest.mark.parametrize("W", [1, 3, 4, 10, 128, 1000])
def test_probe_rows_are_deterministic_sorted_and_sized(cfg, W):
    a = probe_rows(W, cfg, seed=123)
    b = probe_rows(W, cfg, seed=123)
    assert torch.equal(a, b)
    rows = a.tolist()
    assert rows == sorted(set(rows)), "sorted and unique"
    assert all(0 <= r < W for r in rows)
    assert len(rows) == expected_probe_count(W, cfg)
    if cfg.strategy in ("recent", "recent_random") and cfg.recent_frac > 0:
        n_recent = min(W, math.ceil(cfg.recent_frac * W))
        assert set(range(W - n_recent, W)) <= set(rows), "the most recent rows are always probes"


def test_probe_rows_depend_on_the_seeds():
    cfg = ProbeConfig(strategy="random", random_frac=0.05)
    base = probe_rows(1000, cfg, seed=0)
    assert not torch.equal(base, probe_rows(1000, cfg, seed=1))
    assert not torch.equal(base, probe_rows(1000, cfg.model_copy(update={"seed": 1}), seed=0))
    # the global RNG plays no part
    torch.manual_seed(0)
    x = probe_rows(1000, cfg, seed=5)
    torch.manual_seed(99)
    torch.rand(10)
    assert torch.equal(x, probe_rows(1000, cfg, seed=5))


def test_probe_rows_edge_cases():
    assert probe_rows(0, ProbeConfig()).numel() == 0
    assert probe_rows(50, ProbeConfig(strategy="exact")).tolist() == list(range(50))
    assert probe_rows(40, ProbeConfig(strategy="recent", recent_frac=0.1, min_probes=1)).tolist() == [36, 37, 38, 39]
