"""The served engine stores and reads what the offline reference says (slow: starts vLLM 6 times).

Two levels:

* **Layer-exact.** The engine runs in-process and records, for a few layers, every step's
  attention inputs and outputs (chunked prefill cut mid-block, batched with decode rows,
  decode filling a block). Replaying each request's recorded q/k/v through the offline
  simulator of the same preset must give the engine's outputs up to float32 summation
  order: same pages, same saliency, same reads.
* **Logprobs end to end.** 20 prompts of 600 tokens of real text, 64 greedy tokens each
  (issue acceptance: >= 20 prompts, >= 512-token contexts, so most of the context sits in
  packed pages): engine logprobs vs the simulator's with the HF model, on SmolLM2 and on
  Gemma 3 (past its sliding window), with the same tolerances.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zipcache_vllm.calibration import rotated_layers
from zipcache_vllm.config import load_preset
from zipcache_vllm.eval import fidelity
from zipcache_vllm.eval.simulate import KVSimulator, SimConfig
from zipcache_vllm.policies import make_policy

# End-to-end tolerances, justified. The HF model that drives the simulator and vLLM's
# model do not feed attention identical q/k/v: on the Xeon with AMX layer 0's inputs agree
# to float32 rounding (1e-6 of their scale, both models), while one earlier run on another
# machine had q and k after vLLM's rotary embedding 1.5e-3 from HF's
# (test_engine_inputs_differ_from_hf_only_after_rope prints each run's gaps); later layers
# add their own rounding. A quantized cache is a discontinuous function of its inputs
# (rounding boundaries, near-ties in the block-local top-k, row ranges of 8-bit staging), so
# such gaps move the logprobs of 64 greedy tokens by about as much as any small change of the
# cache does. Measured on 8 prompts (the engine's tokens replayed, median |delta logprob|):
# the default preset's simulation against itself with Gaussian noise of 1e-5 on q and k,
# 0.037; against the same preset with bf16 staging, 0.033; the engine against the
# simulation, 0.032; the simulation against the uncompressed cache, 0.050. So per-token
# agreement cannot be tight; what the engine must reproduce is the *size* of its preset's
# quantization effect (a wrong bit width, saliency or staging precision changes it: bf16
# instead of 8-bit staging moved it by 17%), and it must sit closer to its preset's
# simulation than to the uncompressed one, as close as float32 rounding allows. Exactness
# (same pages, same reads, given the same inputs) is proven by the layer-exact test below,
# on all 4 recorded layers of every step, for chunked and for whole prompts.
# How close, then? The simulation itself, fed inputs moved by float32 rounding
# (fidelity.ROUNDING_NOISE), sits at 0.62x / 0.64x of the effect (median / mean) from
# itself on SmolLM2 and 0.80x / 0.71x on Gemma 3 (the engine's tokens, 2026-12-07): no
# implementation of the preset fed the engine's inputs can be expected closer than that
# floor, which the same run measures (``sim_vs_rounding_noise``). The engine must sit
# within ROUNDING_SLACK of it on both models; measured 0.87x / 0.87x of the floor on
# SmolLM2 and 0.86x / 0.89x on Gemma 3 (a fixed 0.75x of the effect, the bar before,
# sits below Gemma's floor).
EFFECT_RTOL = 0.12
ROUNDING_SLACK = 1.25
LAYER_ATOL = 1e-4  # float32 summation order only, relative to max(1, max |out|) (measured 3.5e-6 to 4.8e-6)
# engine vs HF inputs of layer 0, before / after RoPE, relative to max(1, max |input|)
# (2026-12-07, Xeon with AMX: q, k, v within 1.0e-6 on SmolLM2 and 6.9e-7 on Gemma 3)
V_RTOL, QK_RTOL = 1e-5, 1e-2


@pytest.fixture(scope="module")
def result(model_dir):
    # Greedy agreement (zipcache vs random saliency, capacity) is not re-measured here: the
    # session's quick engine eval asserts both for every dtype (test_engine_eval.py).
    return fidelity.run(str(model_dir), num_prompts=20, prompt_len=600, max_tokens=64, progress=False,
                        greedy_dtypes=())


@pytest.fixture(scope="module")
def result_gemma3(gemma_dir):
    """The same on Gemma 3: 600-token prompts run past its 512-token window, so the
    sliding-window layers' packed reads are in every logprob."""
    return fidelity.run(str(gemma_dir), num_prompts=20, prompt_len=600, max_tokens=64, progress=False,
                        greedy_dtypes=())


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.parametrize("run", ["result", "result_gemma3"])
def test_engine_logprobs_match_the_offline_reference(run, request):
    f = request.getfixturevalue(run)["fidelity"]
    print(f)
    assert f["tokens"] == 20 * 64
    for stat in ("median", "mean"):
        effect, sim_effect = f["vs_uncompressed"][stat], f["sim_vs_uncompressed"][stat]
        assert abs(effect - sim_effect) <= EFFECT_RTOL * sim_effect, (stat, effect, sim_effect)
        floor = f["sim_vs_rounding_noise"][stat]
        assert f["vs_same_preset"][stat] <= ROUNDING_SLACK * floor, (stat, f["vs_same_preset"][stat], floor)
        assert floor < effect  # the floor is below the effect it must resolve


def _requests_of(steps: list[dict], layer: int) -> list[dict]:
    """Each request's rows of one layer in order, joined across steps. A row with ctx 0
    starts a request; a later row continues the request its staging slot held, or, when
    its block moved to another slot (a hybrid model's pool has slots for every KV-cache
    group), the one live request at that length."""
    live: dict[int, dict] = {}
    done = []
    for st in (s for s in steps if s["layer"] == layer):
        for q_start, q_len, ctx, slot in st["rows"]:
            rows = slice(q_start, q_start + q_len)
            if ctx == 0:
                if slot in live:
                    done.append(live.pop(slot))
                live[slot] = {k: [] for k in ("q", "k", "v", "out")}
                live[slot]["len"] = 0
            elif slot not in live or live[slot]["len"] != ctx:
                at = [s for s, r in live.items() if r["len"] == ctx]
                assert len(at) == 1, f"cannot tell which request continues at {ctx}"
                if slot in live:  # the slot's earlier request moved on to another slot
                    live[("moved", len(done), slot)] = live.pop(slot)
                live[slot] = live.pop(at[0])
            req = live[slot]
            for name in ("q", "k", "v", "out"):
                req[name].append(st[name][rows])
            req["len"] += q_len
    done += live.values()
    return [{k: (torch.cat(r[k]) if k != "len" else r[k]) for k in r} for r in done]


class _Layer:
    layer_idx = 0


def _record(model_dir, tmp_path_factory, *budget: str) -> dict:
    out = tmp_path_factory.mktemp("record") / "steps.pt"
    script = Path(__file__).with_name("_record_engine.py")
    proc = subprocess.run([sys.executable, str(script), str(model_dir), str(out), *budget],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def recorded(model_dir, tmp_path_factory):
    """Chunked prefill (200-token budget), batched with decode."""
    return _record(model_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def recorded_whole_prompts(model_dir, tmp_path_factory):
    """Every prompt prefilled in one chunk, as in the end-to-end comparison."""
    return _record(model_dir, tmp_path_factory, "4096")


@pytest.fixture(scope="module")
def recorded_head_128(model_dir, tmp_path_factory):
    """A tiny random Llama with head size 128 and GQA 4:1 (tests/_tiny_llama.py), chunked
    prefill batched with decode as in ``recorded``; both of its layers. Served with
    ``zipcache_kivi2``: the paged kernels, 8-bit staging, packing and reads at head size 128,
    without saliency. A random model's attention is close to uniform, so the block-local
    top-k of ``zipcache`` meets near-ties that float32 summation order decides: with
    ``zipcache`` here, 2 of the 6 (layer, request) pairs differed from the reference from a
    block boundary on (by 1.5e-4 and 3.3e-4; every token before it within 7e-6), which is a
    tie flipped, not a wrong read. The saliency kernels at head size 128 are held to their
    references in tests/step/ and tests/kernels/."""
    from _tiny_llama import build_tiny_llama

    tiny = build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), model_dir)
    return _record(tiny, tmp_path_factory, "200", "0,1", "zipcache_kivi2")


@pytest.fixture(scope="module")
def recorded_gemma3(gemma_dir, tmp_path_factory):
    """Gemma 3 270M (head size 256, one KV head, sliding window 512 on 15 of 18 layers),
    chunked prefill batched with decode as in ``recorded``: layers 0 and 4 (sliding) and 5
    (full). The 600-token prompt and its decode run past the window: chunks and decode rows
    read the packed blocks where their windows start under a per-query mask, and never
    the blocks vLLM's sliding-window manager freed."""
    return _record(gemma_dir, tmp_path_factory, "200", "0,4,5", "zipcache")


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.parametrize("rec", ["recorded", "recorded_whole_prompts", "recorded_head_128",
                                 "recorded_gemma3"])
def test_engine_attention_equals_the_reference_on_its_own_inputs(rec, request):
    """Every recording: chunks cut mid-block batched with decode, whole prompts (one chunk
    across several blocks, as the end-to-end comparison runs them), the head-size-128
    GQA 4:1 model (chunked) and Gemma 3 (sliding windows, head size 256) against the dense
    reference of the same pages (the simulator with the layer's window)."""
    recorded = request.getfixturevalue(rec)
    steps, seqs = recorded["steps"], recorded["seqs"]
    if rec != "recorded_whole_prompts":
        assert any(len(st["rows"]) > 1 and any(r[1] == 1 for r in st["rows"])
                   and any(r[1] > 1 for r in st["rows"]) for st in steps), "no mixed prefill+decode step"
    expected_lens = sorted(len(s) - 1 for s in seqs)  # the last token is never fed back
    preset = load_preset(fidelity.preset_of(recorded["kv_cache_dtype"]))
    windows = {st["layer"]: st.get("sliding_window") for st in steps}
    rotated = {st["layer"]: st["rotate_keys"] for st in steps}
    if rec == "recorded_gemma3":  # sliding and full layers, requests past the window
        assert set(windows.values()) == {512, None} and max(expected_lens) > 512 + 128
        calibration = rotated_layers(request.getfixturevalue("gemma_dir"))  # configs/calibrations/, by prepare
        assert rotated == {layer: calibration[layer] for layer in rotated}
        assert set(rotated.values()) == {True, False}  # both bases among the recorded layers
    worst = 0.0
    for layer in recorded["layers"]:
        reqs = _requests_of(steps, layer)
        assert sorted(r["len"] for r in reqs) == expected_lens
        scale = next(st["scale"] for st in steps if st["layer"] == layer)
        window = windows[layer]
        # the layer's pages as the engine stored them: a calibrated key rotation resolved
        layer_preset = preset.model_copy(update={"key_rotation": "hadamard" if rotated[layer] else "none"})
        for r in reqs:
            sim = KVSimulator(make_policy(layer_preset),
                              SimConfig(prefill_len=0, chunk_size=steps[0]["preset_block"]))
            ref, _ = sim(_Layer(), *(r[n].transpose(0, 1).unsqueeze(0) for n in ("q", "k", "v")),
                         scaling=scale, sliding_window=window)
            # relative to the layer's outputs (Gemma's layer 0 outputs reach 80)
            err = float((r["out"].float() - ref[0]).abs().max()) / max(1.0, float(ref.abs().max()))
            worst = max(worst, err)
            assert err < LAYER_ATOL, (layer, r["len"], err)
    print(f"\n{rec}, layer-exact: {len(recorded['layers'])} layers x {len(seqs)} requests, "
          f"max |engine - reference| = {worst:.2e}")


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.parametrize("rec", ["recorded", "recorded_whole_prompts", "recorded_gemma3"])
def test_engine_inputs_differ_from_hf_only_after_rope(rec, request):
    """Why the end-to-end bound is relative: layer 0's v (no RoPE) is the same in the engine
    and in HF up to float32 rounding; q and k (after vLLM's and HF's rotary embeddings) may
    differ more. A chunked and a whole-prompt recording of SmolLM2 and Gemma 3's chunked
    one are checked."""
    recorded = request.getfixturevalue(rec)
    from transformers import AttentionInterface

    from zipcache_vllm.eval.offline import ATTN_NAME, load_model

    model_dir = request.getfixturevalue("gemma_dir" if rec == "recorded_gemma3" else "model_dir")
    model, _ = load_model(str(model_dir))
    by_len = {r["len"]: r for r in _requests_of(recorded["steps"], 0)}
    seen = {}

    def capture(module, query, key, value, *args, **kwargs):
        if module.layer_idx == 0:
            seen.update(q=query[0].transpose(0, 1), k=key[0].transpose(0, 1), v=value[0].transpose(0, 1))
        return torch.nn.functional.scaled_dot_product_attention(
            query, key.repeat_interleave(query.shape[1] // key.shape[1], 1),
            value.repeat_interleave(query.shape[1] // key.shape[1], 1), is_causal=True,
            scale=kwargs.get("scaling")).transpose(1, 2), None

    AttentionInterface.register(ATTN_NAME, capture)
    model.set_attn_implementation(ATTN_NAME)
    gaps = {"q": 0.0, "k": 0.0, "v": 0.0}
    with torch.inference_mode():
        for seq in recorded["seqs"]:
            ids = seq[:-1]
            model(input_ids=torch.tensor([ids]), use_cache=False, logits_to_keep=1)
            eng = by_len[len(ids)]
            for n in gaps:  # relative to the input's scale (Gemma's layer-0 values reach ~10)
                ref = seen[n].float()
                gap = float((eng[n].float() - ref).abs().max()) / max(1.0, float(ref.abs().max()))
                gaps[n] = max(gaps[n], gap)
    print(f"\n{rec}: layer 0, engine vs HF, max |gap| / max(1, max |HF|): "
          f"q {gaps['q']:.2e}, k {gaps['k']:.2e}, v {gaps['v']:.2e}")
    assert gaps["v"] < V_RTOL
    assert gaps["q"] < QK_RTOL and gaps["k"] < QK_RTOL
