"""Policies and the paged-cache simulator, without a model."""
import pytest
import torch

from zipcache_vllm.config import PresetError, load_preset, parse_preset
from zipcache_vllm.eval.simulate import KVSimulator, SimConfig
from zipcache_vllm.layout import BlockLayout
from zipcache_vllm.policies import POLICIES, make_policy
from zipcache_vllm.policies.fastgen import HYBRID
from zipcache_vllm.quant.block import fake_quantize_blocks, topk_salient_mask
from zipcache_vllm.quant.masked import fake_quantize_masked

HEAD_SIZES = (64, 128)
GQA = ((3, 3), (9, 3), (8, 2), (8, 1))  # (query heads, KV heads)


class _Module:
    layer_idx = 0


def _qkv(hq, hk, L, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, hq, L, D, generator=g), torch.randn(1, hk, L, D, generator=g) * 2,
            torch.randn(1, hk, L, D, generator=g))


def _packed_prefix(policy, k, v, n):
    """``k, v [1, Hk, L, D]`` with their first ``n`` tokens (whole blocks of 128) as the
    policy packs them with no salient token."""
    hk, D = k.shape[1], k.shape[-1]
    kb = k[0, :, :n].transpose(0, 1).reshape(n // 128, 128, hk, D)
    vb = v[0, :, :n].transpose(0, 1).reshape(n // 128, 128, hk, D)
    kh, vh = policy.compress(kb, vb, torch.zeros(n // 128, hk, 128, dtype=torch.bool))
    k2, v2 = k.clone(), v.clone()
    k2[0, :, :n] = kh.reshape(n, hk, D).transpose(0, 1)
    v2[0, :, :n] = vh.reshape(n, hk, D).transpose(0, 1)
    return k2, v2


def _dense(q, k, v, scale):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    L = q.shape[2]
    logits = (q @ k.transpose(-1, -2)) * scale
    logits = logits.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    return (torch.softmax(logits, -1) @ v).transpose(1, 2)


@pytest.mark.parametrize("n_hi,bits", [(58, (4, 2)), (0, (3, 3)), (128, (4, 4)), (13, (4, 2))])
@pytest.mark.parametrize("D", HEAD_SIZES)
def test_masked_fake_quant_equals_packed_round_trip(n_hi, bits, D):
    layout = BlockLayout(128, D, 3, *bits, n_hi)
    k, v = torch.randn(4, 128, 3, D) * 3 + 1, torch.randn(4, 128, 3, D)
    mask = topk_salient_mask(torch.rand(4, 3, 128), n_hi)
    a, b = fake_quantize_blocks(k, v, mask, layout), fake_quantize_masked(k, v, mask, *bits)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)


def test_every_method_has_a_policy_and_presets_load():
    from zipcache_vllm.config import list_presets

    for name in list_presets():
        preset = load_preset(name)
        assert preset.method in POLICIES
        make_policy(preset)


def test_a_method_must_be_registered_and_agree_with_its_saliency():
    with pytest.raises(PresetError, match="unknown method 'nosuch'.*h2o_mixed"):
        make_policy(parse_preset({"name": "x", "method": "nosuch"}, "x.yaml"))
    with pytest.raises(PresetError, match="saliency_source must be 'accumulated'"):
        parse_preset({"name": "x", "method": "h2o_mixed", "saliency_source": "random"}, "x.yaml")
    assert parse_preset({"name": "x", "method": "random_mixed"}, "x.yaml").saliency_source is None


def test_bad_presets_name_the_field():
    with pytest.raises(PresetError, match="hi_bits"):
        parse_preset({"name": "x", "method": "zipcache", "hi_bits": 5}, "x.yaml")
    with pytest.raises(PresetError, match="salient_ratio"):
        parse_preset({"name": "x", "method": "zipcache", "salient_ratio": 1.5}, "x.yaml")
    with pytest.raises(PresetError, match="lo_bits"):
        parse_preset({"name": "x", "method": "zipcache", "hi_bits": 2, "lo_bits": 4}, "x.yaml")
    with pytest.raises(PresetError, match="valid presets: .*zipcache"):
        load_preset("no_such_preset")


@pytest.mark.parametrize("hq,hk", GQA)
@pytest.mark.parametrize("D", HEAD_SIZES)
@pytest.mark.parametrize("L", [128, 300, 517])
def test_simulator_without_compression_is_causal_attention(hq, hk, D, L):
    q, k, v = _qkv(hq, hk, L, D)
    sim = KVSimulator(make_policy("none"), SimConfig(prefill_len=128, chunk_size=128))
    out, _ = sim(_Module(), q, k.bfloat16().float(), v.bfloat16().float(), scaling=D ** -0.5)
    torch.testing.assert_close(out, _dense(q, k.bfloat16().float(), v.bfloat16().float(), D ** -0.5),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hq,hk", GQA[:2])
def test_simulator_reads_compressed_blocks_only_from_earlier_chunks(hq, hk):
    """Queries of the prompt chunk see exact K/V; later queries see the dequantized pages."""
    D, L, P = 64, 300, 256
    q, k, v = _qkv(hq, hk, L, D, seed=1)
    policy = make_policy(make_policy("kivi2").preset.model_copy(update={"staging_bits": None}))  # decode exact
    sim = KVSimulator(policy, SimConfig(prefill_len=P, chunk_size=128))
    out, _ = sim(_Module(), q, k, v, scaling=D ** -0.5)
    torch.testing.assert_close(out[:, :P], _dense(q, k, v, D ** -0.5)[:, :P], rtol=1e-4, atol=1e-5)
    k2, v2 = _packed_prefix(policy, k, v, P)
    torch.testing.assert_close(out[:, P:], _dense(q, k2, v2, D ** -0.5)[:, P:], rtol=1e-4, atol=1e-5)
    assert (out[:, P:] - _dense(q, k, v, D ** -0.5)[:, P:]).abs().max() > 1e-3


def test_a_delayed_block_is_read_exact_until_the_next_block_fills():
    """``saliency_delay=1``: a filled block waits in staging until the next one fills; the
    prompt's last block and the decode tokens after it stay exact, the block before is packed."""
    hq, hk, D, L, P = 4, 2, 64, 300, 256
    q, k, v = _qkv(hq, hk, L, D, seed=6)
    policy = make_policy(make_policy("kivi2").preset.model_copy(update={"staging_bits": None}))
    sim = KVSimulator(policy, SimConfig(prefill_len=P, chunk_size=128, saliency_delay=1))
    out, _ = sim(_Module(), q, k, v, scaling=D ** -0.5)
    k2, v2 = _packed_prefix(policy, k, v, 128)
    torch.testing.assert_close(out[:, P:], _dense(q, k2, v2, D ** -0.5)[:, P:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("delay,salient", [(0, False), (1, True)])
def test_a_delayed_block_is_scored_by_the_next_blocks_probes(delay, salient):
    """A token that only the next block's queries attend to is salient when its block waits
    for them (``saliency_delay=1``), not when it is ranked by its own block's queries."""
    hk, hq, D, L, B = 1, 1, 64, 384, 128
    g = torch.Generator().manual_seed(7)
    k = torch.randn(1, hk, L, D, generator=g) * 0.1
    v = torch.randn(1, hk, L, D, generator=g)
    q = torch.randn(1, hq, L, D, generator=g) * 0.1
    key = torch.zeros(D)
    key[0] = 1.0
    k[0, :, 40] = key * 30  # token 40: a key that only the queries of block 1 look for
    q[0, :, B:2 * B] += key * 30
    q[0, :, :B] -= key * 30
    preset = load_preset("zipcache").model_copy(update={"key_rotation": "none"})
    sim = KVSimulator(make_policy(preset), SimConfig(prefill_len=0, chunk_size=B, saliency_delay=delay))
    seen = {}
    select = sim.policy.select

    def spy(scores):
        mask = select(scores)
        seen.setdefault("block0", mask[0])
        return mask

    sim.policy.select = spy
    sim(_Module(), q, k, v, scaling=D ** -0.5)
    assert bool(seen["block0"][0, 40]) is salient


def test_staging_in_8_bits_rounds_what_every_query_reads():
    """``staging_bits=8``: until its block is packed, every query reads a token as its 8-bit
    rounding per token and head (the prompt chunk's own queries too, as the engine does
    whatever the chunking). With the identity policy nothing is ever packed: the output is
    dense attention over the rounded keys and values."""
    from zipcache_vllm.eval.simulate import _fake_int8

    hq, hk, D, L = 4, 2, 64, 200
    q, k, v = _qkv(hq, hk, L, D, seed=3)
    exact = KVSimulator(make_policy("none"), SimConfig(prefill_len=128, chunk_size=128))
    rounded = KVSimulator(make_policy("none"), SimConfig(prefill_len=128, chunk_size=128, staging_bits=8))
    a, _ = exact(_Module(), q, k, v, scaling=D ** -0.5)
    b, _ = rounded(_Module(), q, k, v, scaling=D ** -0.5)
    want = _dense(q, _fake_int8(k[0])[None], _fake_int8(v[0])[None], D ** -0.5)
    torch.testing.assert_close(b, want, rtol=1e-4, atol=1e-5)
    assert 0 < (a - b).abs().max() < 0.05


def test_saliency_policies_rank_a_dominant_token_first():
    """A token that draws most attention must be salient for zipcache and h2o, not for random in general."""
    hk, hq, B = 1, 2, 128
    probs = torch.full((hq, B, B), 1e-3).tril()
    probs[:, :, 70] = torch.where(torch.arange(B) >= 70, 0.5, 0.0).unsqueeze(0)
    pos = torch.arange(B)
    for name in ("zipcache", "h2o_mixed"):
        pol = make_policy(name)
        scores = pol.rank_from_probs(probs, pos, pos, hk, B, 0)
        assert pol.select(scores.unsqueeze(0))[0, 0, 70]


def test_normalized_saliency_removes_the_early_token_bias():
    """Uniform attention over visible keys: accumulated favours early tokens, normalized is flat."""
    B = 64
    probs = (torch.ones(B, B).tril() / torch.arange(1, B + 1).unsqueeze(1)).unsqueeze(0)
    pos = torch.arange(B)
    acc = make_policy("h2o_mixed").rank_from_probs(probs, pos, pos, 1, B, 0)[0]
    norm = make_policy("zipcache_exact").rank_from_probs(probs, pos, pos, 1, B, 0)[0]
    assert acc[0] > 3 * acc[-8]
    assert norm.max() / norm.min() < acc.max() / acc.min()


def test_fastgen_profile_picks_cheapest_rung_reaching_threshold():
    pol = make_policy("fastgen_t90")
    L = 40
    special = torch.zeros(L, dtype=torch.bool)
    special[0] = True
    punct = torch.zeros(L, dtype=torch.bool)
    probs = torch.zeros(2, L, L)
    probs[0, :, 0] = 1.0  # head 0: all mass on the special token
    probs[1] = torch.ones(L, L).tril() / torch.arange(1, L + 1).unsqueeze(1)  # head 1: uniform
    choice, _ = pol.profile(probs, special, punct, 2)
    assert HYBRID[int(choice[0])] == ("special",)
    assert HYBRID[int(choice[1])] == ("full",)


def test_fastgen_visibility_keeps_special_and_self():
    pol = make_policy("fastgen_t90")
    L = 20
    special = torch.zeros(L, dtype=torch.bool)
    special[0] = True
    punct = torch.zeros(L, dtype=torch.bool)
    vis = pol.visible(torch.tensor([0]), torch.zeros(1, L, dtype=torch.bool), special, punct,
                      torch.arange(L), torch.arange(10, L))
    assert vis[0, :, 0].all()
    assert vis[0].sum(-1).eq(2).all()


def test_every_offline_variant_runs_in_the_simulator():
    """Each table row and ablation (windows, top-k scopes, probe strategies) simulates without a model."""
    from zipcache_vllm.eval.offline import ablation_variants, standard_variants

    q, k, v = _qkv(6, 2, 384, 64, seed=4)
    for variant in standard_variants() + ablation_variants():
        sim = KVSimulator(make_policy(variant.preset), variant.sim_config(256))
        sim.reset(torch.zeros(384, dtype=torch.bool), torch.zeros(384, dtype=torch.bool))
        out, _ = sim(_Module(), q, k, v, scaling=0.125)
        assert out.shape == (1, 384, 6, 64) and torch.isfinite(out).all(), variant.label


def test_sequence_topk_keeps_the_total_salient_budget():
    q, k, v = _qkv(6, 2, 512, 64, seed=5)
    preset = load_preset("zipcache").model_copy(update={"topk_scope": "sequence"})
    sim = KVSimulator(make_policy(preset), SimConfig(256, 128))
    masks = sim._prepass_masks(q[0].float(), k[0].float(), 0.125)
    total = torch.stack([masks[j] for j in sorted(masks)]).sum((0, 2))
    assert total.tolist() == [preset.n_salient * len(masks)] * 2
