"""Paged FastGen: page layout, profiling, slot selection, and engine flow == offline simulator.

The engine's step (``engine/step.py``) with the FastGen policy and its engine state
is driven like the engine drives it (one prompt chunk, then one decode token per
step) and must give the offline simulator's outputs (``eval/fastgen_sim.py``), which
the quality table is computed with.
"""
import pytest
import torch

from zipcache_vllm.config import PresetError, list_presets, load_preset, parse_preset
from zipcache_vllm.eval.simulate import KVSimulator, SimConfig
from zipcache_vllm.policies.fastgen_pages import (FULL, ladder_choice, pack_pages, read_counts, read_rungs,
                                         select_slots, unpack_pages)
from zipcache_vllm.eval.fastgen_sim import class_bytes
from zipcache_vllm.policies.token_classes import PUNCT, SPECIAL, build_class_table, is_punct_text
from zipcache_vllm.layout import FastGenLayout
from zipcache_vllm.policies import make_policy
from zipcache_vllm.quant.block import fake_quantize_blocks, topk_salient_mask
from zipcache_vllm.dtypes import cache_dtypes, dtype_for_preset
from zipcache_vllm.engine.step import run_request_step
from zipcache_vllm.policies.fastgen import FastGenRow
from zipcache_vllm.engine.staging import StagedBlock

PAGED = ("fastgen_t90", "fastgen_t95", "fastgen_t98", "zipcache_fastgen", "zipcache_fastgen_hc")


class _Module:
    layer_idx = 0


def test_paged_presets_are_engine_dtypes_with_unique_names():
    table = cache_dtypes()
    for name in PAGED:
        dtype = name if name.startswith("zipcache_") else f"zipcache_{name}"
        assert table[dtype] == name
    assert "zipcache_fastgen_ideal_t95" not in table  # offline-only (no slots): no dtype
    # Two presets must never map to one dtype (fastgen_t90 and a "zipcache_fastgen_t90" would).
    paged = [n for n in list_presets() if load_preset(n).quantizes or load_preset(n).paged_fastgen]
    names = [dtype_for_preset(n) for n in paged]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("name", PAGED)
def test_layout_capacity_grows_by_block_over_slots(name):
    preset = load_preset(name)
    lay = FastGenLayout.from_preset(preset, 64, 3)
    S, B = preset.fastgen.slots, preset.block_size
    assert lay.page_bytes == lay.kept.page_bytes + lay.trailer_bytes
    assert lay.trailer_bytes == 16 and lay.page_bytes % 16 == 0
    # Capacity per byte vs the same storage without eviction: B / S, up to the 16-byte trailer.
    full = lay.kept.page_bytes / S
    assert lay.page_bytes / B == pytest.approx(full * S / B, rel=16 / lay.kept.page_bytes + 1e-9)
    assert lay.compression_vs_bf16 > (2.0 if not preset.fastgen.mixed else 4.6)


def test_bad_paged_presets_are_rejected():
    base = {"name": "x", "method": "fastgen", "block_size": 128}
    for fg in ({"slots": 100, "kept_bits": 8}, {"slots": 136, "kept_bits": 8}, {"slots": 64},
               {"mixed": True}):
        with pytest.raises(PresetError):
            parse_preset({**base, "fastgen": fg}, "test")


def test_pages_roundtrip_and_trailer():
    preset = load_preset("zipcache_fastgen")
    lay = FastGenLayout.from_preset(preset, 64, 2)
    g = torch.Generator().manual_seed(0)
    n, B, H, D, S = 2, 128, 2, 64, lay.slots
    k, v = torch.randn(n, B, H, D, generator=g), torch.randn(n, B, H, D, generator=g)
    score = torch.rand(n, H, B, generator=g)
    kept = torch.rand(n, H, B, generator=g).topk(S, -1).indices.sort(-1).values
    rung = torch.tensor([[0, 4], [2, 3]])
    pages = pack_pages(k, v, score, kept, rung, lay)
    assert pages.shape == (n, lay.page_bytes)
    assert read_rungs(pages, lay).tolist() == rung.tolist()
    assert (read_counts(pages, lay) == S).all()
    kd, vd = unpack_pages(pages, lay)
    idx = kept.unsqueeze(-1).expand(n, H, S, D)
    ks = torch.gather(k.permute(0, 2, 1, 3), 2, idx).transpose(1, 2)  # [n, S, H, D], kept in position order
    vs = torch.gather(v.permute(0, 2, 1, 3), 2, idx).transpose(1, 2)
    salient = topk_salient_mask(torch.gather(score, 2, kept), lay.kept.n_hi)
    kr, vr = fake_quantize_blocks(ks, vs, salient, lay.kept)  # the ZipCache quantizer on the kept tokens
    assert torch.equal(kd, kr.transpose(1, 2)) and torch.equal(vd, vr.transpose(1, 2))


def test_ladder_picks_cheapest_rung():
    L = 20
    special = torch.zeros(L, dtype=torch.bool)
    special[0] = True
    punct = torch.zeros(L, dtype=torch.bool)
    punct[5] = True
    acc = torch.full((3, L), 0.01)
    acc[0, 0] = 10.0  # all mass on the special token
    acc[1, 5] = 10.0
    acc[1, 0] = 1.0  # special + punct
    rung = ladder_choice(acc, special, punct, 0.9, 0.3, 0.3)
    assert rung.tolist() == [0, 1, FULL]  # uniform head: no cheap rung reaches 0.9


def test_select_slots_priority_then_score():
    B, S = 16, 8
    cfg = load_preset("fastgen_t95").fastgen
    score = torch.arange(B, dtype=torch.float32).flip(0).expand(1, 2, B).clone()  # early tokens score high
    cls = torch.zeros(1, B, dtype=torch.uint8)
    cls[0, 15] = SPECIAL
    cls[0, 14] = PUNCT
    rung = torch.tensor([[1, FULL]])
    kept = select_slots(score, rung, cls, torch.tensor([0]), torch.tensor([16]), cfg, S)
    assert 15 in kept[0, 0].tolist() and 14 in kept[0, 0].tolist()  # rung special+punct keeps them
    assert kept[0, 1].tolist() == list(range(8))  # "full" falls back to the top-S by score
    assert kept[0, 0].tolist() == sorted(kept[0, 0].tolist())


def test_class_table_special_and_punct():
    class Tok:
        all_special_ids = [0]
        vocab = ["<s>", "Ġ,", "hello", "Ġ", ".\n", "a."]

        def __len__(self):
            return len(self.vocab)

        def convert_ids_to_tokens(self, ids):
            return [self.vocab[i] for i in ids]

        def convert_tokens_to_string(self, toks):
            return "".join(toks).replace("Ġ", " ")

    t = build_class_table(Tok())
    assert t.tolist() == [SPECIAL, PUNCT, 0, PUNCT, PUNCT, 0]
    assert is_punct_text(" ,\n") and not is_punct_text("") and not is_punct_text("a,")


def _engine_steps(q, k, v, preset, prompt_len, scale, cls):
    """Outputs ``[L, Hq, D]`` of the FastGen step driven as prefill + decode steps."""
    L, Hq, D = q.shape
    H = k.shape[1]
    lay = FastGenLayout.from_preset(preset, D, H)
    B = lay.block_size
    policy = make_policy(preset)
    pages = torch.zeros(L // B + 1, lay.page_bytes, dtype=torch.uint8)

    def empty():
        return StagedBlock(torch.zeros(H, B, D), torch.zeros(H, B, D), torch.zeros(H, B), torch.zeros(B))

    staged, outs, ctx, n_pages, rung = empty(), [], 0, 0, None
    for a, b in [(0, prompt_len)] + [(t, t + 1) for t in range(prompt_len, L)]:
        s = ctx % B
        if ctx and not s:
            rung = read_rungs(pages[n_pages - 1:n_pages], lay)[0]
        row = FastGenRow(cls[ctx - s:b], rung, ctx - s, b)
        res = run_request_step(q[a:b], k[a:b], v[a:b], ctx, torch.arange(n_pages), pages, staged,
                               lay, policy, scale, row)
        rung = row.rung
        n_new = res.pages.shape[0]
        pages[n_pages:n_pages + n_new] = res.pages
        n_pages += n_new
        staged, t = empty(), res.tail_len
        staged.k[:, :t], staged.v[:, :t] = res.tail_k, res.tail_v
        staged.score[:, :t], staged.count[:t] = res.tail_score, res.tail_count
        outs.append(res.out)
        ctx = b
    return torch.cat(outs)


CASES = [("fastgen_t90", 6, 2, 300), ("zipcache_fastgen", 6, 2, 300), ("fastgen_t95", 3, 3, 128),
         ("zipcache_fastgen", 8, 1, 77)]


@pytest.mark.parametrize("preset_name,hq,hk,prompt_len", CASES)
def test_simulator_equals_fastgen_engine_flow(preset_name, hq, hk, prompt_len):
    base = load_preset(preset_name)
    preset = base.model_copy(update={"block_size": 64, "fastgen": base.fastgen.model_copy(update={"slots": 40})})
    L, D = prompt_len + 90, 64
    g = torch.Generator().manual_seed(7)
    q = torch.randn(L, hq, D, generator=g)
    k = torch.randn(L, hk, D, generator=g) * 2
    v = torch.randn(L, hk, D, generator=g)
    special = torch.rand(L, generator=g) < 0.03
    special[0] = True
    punct = (torch.rand(L, generator=g) < 0.15) & ~special
    scale = D ** -0.5
    engine = _engine_steps(q, k, v, preset, prompt_len, scale, class_bytes(special, punct, L))
    sim = KVSimulator(make_policy(preset), SimConfig(prefill_len=prompt_len, chunk_size=64))
    sim.reset(special, punct)
    out, _ = sim(_Module(), q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                 v.transpose(0, 1).unsqueeze(0), scaling=scale)
    torch.testing.assert_close(engine, out[0], rtol=1e-4, atol=1e-4)
    n_packed = L // 64
    assert sim.stats.kept_fraction[0] == pytest.approx((n_packed * 40 + L - n_packed * 64) / L)
