"""The offline simulator and the engine's step flow compute the same thing.

The backend's per-request step (``engine/step.py``: packed pages, staging,
in-block saliency, quantize-on-fill) is driven step by step like the engine
drives it: one prefill chunk of any length, then one decode token per step.
Its attention outputs must equal the simulator's (``eval/simulate.py``), which
the offline quality table is computed with: so the table describes what the
engine really serves.
"""
import pytest
import torch

from zipcache_vllm.config import USER_CONFIG_ENV, load_preset
from zipcache_vllm.eval.simulate import KVSimulator, SimConfig
from zipcache_vllm.layout import BlockLayout
from zipcache_vllm.policies import POLICIES, KVPolicy, make_policy, register
from zipcache_vllm.engine.staging import StagedBlock
from zipcache_vllm.engine.plan import plan_step
from zipcache_vllm.engine.staging import StagingPool
from zipcache_vllm.engine.step import apply_step, rotate_inputs, rotate_values, run_request_step
from zipcache_vllm.kernels import build
from zipcache_vllm.layout import StagingLayout


class _Module:
    layer_idx = 0


def _engine_steps(q, k, v, preset, prompt_len, scale):
    """Outputs ``[L, Hq, D]`` of the flow driven as prefill + decode steps."""
    L, Hq, D = q.shape
    H = k.shape[1]
    layout = BlockLayout.from_preset(preset, D, H)
    q, k = rotate_inputs(layout, q, k)  # what apply_step does first
    v = rotate_values(layout, v)
    B = layout.block_size
    policy = make_policy(preset)
    C = B * policy.staged_blocks
    pages = torch.zeros(L // B + 1, layout.page_bytes, dtype=torch.uint8)
    staged = StagedBlock(torch.zeros(H, C, D), torch.zeros(H, C, D), torch.zeros(H, C), torch.zeros(C))
    outs, ctx, n_pages, t = [], 0, 0, 0
    steps = [(0, prompt_len)] + [(t, t + 1) for t in range(prompt_len, L)]
    for a, b in steps:
        res = run_request_step(q[a:b], k[a:b], v[a:b], ctx, torch.arange(n_pages), pages, staged,
                               layout, policy, scale, n_staged=t)
        n_new = res.pages.shape[0]
        pages[n_pages:n_pages + n_new] = res.pages
        n_pages += n_new
        staged = StagedBlock(torch.zeros(H, C, D), torch.zeros(H, C, D), torch.zeros(H, C), torch.zeros(C))
        t = res.tail_len
        staged.k[:, :t], staged.v[:, :t] = res.tail_k, res.tail_v
        staged.score[:, :t], staged.count[:t] = res.tail_score, res.tail_count
        outs.append(res.out)
        ctx = b
    return rotate_values(layout, torch.cat(outs))  # and last


def _inputs(L: int, hq: int, hk: int, seed: int, D: int = 64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(L, hq, D, generator=g), torch.randn(L, hk, D, generator=g) * 2,
            torch.randn(L, hk, D, generator=g))


def _simulated(q, k, v, preset, prompt_len, scale):
    """The simulator's outputs ``[L, Hq, D]`` for the same sequence and schedule."""
    sim = KVSimulator(make_policy(preset), SimConfig(prefill_len=prompt_len, chunk_size=64))
    out, _ = sim(_Module(), q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                 v.transpose(0, 1).unsqueeze(0), scaling=scale)
    return out[0]


CASES = ([(name, 6, 2, 300) for name in ("zipcache", "zipcache_exact", "h2o_mixed", "random_mixed", "kivi3")]
         + [("zipcache", 3, 3, 128), ("zipcache", 8, 1, 77), ("zipcache+value_rotation", 6, 2, 300)])


@pytest.mark.parametrize("preset_name,hq,hk,prompt_len", CASES)
def test_simulator_equals_engine_flow(preset_name, hq, hk, prompt_len):
    name, _, extra = preset_name.partition("+")
    # staging in the model dtype: this flow holds the staged block itself (8-bit staging runs
    # through the pool and the fused decode kernel: test_8bit_staging_...)
    update = ({"block_size": 64, "salient_ratio": 0.45, "staging_bits": None}
              | ({"value_rotation": "hadamard"} if extra else {}))
    preset = make_policy(name).preset.model_copy(update=update)
    q, k, v = _inputs(prompt_len + 90, hq, hk, 7)  # decode crosses a block boundary
    scale = q.shape[-1] ** -0.5
    engine = _engine_steps(q, k, v, preset, prompt_len, scale)
    torch.testing.assert_close(engine, _simulated(q, k, v, preset, prompt_len, scale),
                               rtol=1e-4, atol=1e-4)


TOY_PRESET = """name: toy_recent
method: toy_recent
description: the most recent tokens of every block at hi_bits (the policy recipe's test)
block_size: 64
hi_bits: 4
lo_bits: 2
salient_ratio: 0.25
"""


@pytest.fixture
def toy_method(tmp_path, monkeypatch):
    """A method added by the recipe of docs/POLICIES.md: one registered class and one
    preset YAML (here in the user preset folder), nothing else."""

    @register("toy_recent")
    class RecentSalient(KVPolicy):
        uses_attention = False
        ranked: list[list[int]] = []

        def rank(self, score, count, block_starts, window_ends=None):
            self.ranked.append(list(block_starts))
            return torch.arange(score.shape[-1], dtype=torch.float32).expand_as(score).clone()

    (tmp_path / "toy_recent.yaml").write_text(TOY_PRESET)
    monkeypatch.setenv(USER_CONFIG_ENV, str(tmp_path))
    yield RecentSalient
    POLICIES.pop("toy_recent")


def test_a_policy_added_by_the_recipe_runs_in_the_engine_and_the_simulator(toy_method):
    preset = load_preset("toy_recent")
    prompt_len = 150
    q, k, v = _inputs(prompt_len + 90, 6, 2, 11)
    scale = q.shape[-1] ** -0.5
    engine = _engine_steps(q, k, v, preset, prompt_len, scale)
    engine_blocks = sorted(s for call in toy_method.ranked for s in call)
    toy_method.ranked.clear()
    simulated = _simulated(q, k, v, preset, prompt_len, scale)
    sim_blocks = sorted(s for call in toy_method.ranked for s in call)
    assert engine_blocks == sim_blocks == [0, 64, 128]  # every filled block, ranked by the toy
    torch.testing.assert_close(engine, simulated, rtol=1e-4, atol=1e-4)
    # the toy's choice is what was stored: zipcache's ranking at the same bytes differs
    zipcache = load_preset("zipcache").model_copy(update={
        "block_size": 64, "salient_ratio": 0.25, "key_rotation": "none"})
    assert not torch.allclose(engine, _engine_steps(q, k, v, zipcache, prompt_len, scale))


def _engine_pool_steps(q, k, v, preset, prompt_len, scale, schedule=None):
    """Outputs ``[L, Hq, D]`` of the engine's own path: paged staging in a pool as the
    preset says (``staging_bits``), plans, ``apply_step`` with the fused decode kernel."""
    L, Hq, D = q.shape
    H = k.shape[1]
    layout = BlockLayout.from_preset(preset, D, H)
    B = layout.block_size
    # float32 tensors: 4-byte elements
    st = StagingLayout.of(layout, 4, preset.staging_bits, preset.staged_blocks)
    nb = -(-L // B) + st.lookahead_blocks
    table = torch.randperm(nb + 2, generator=torch.Generator().manual_seed(1))[:nb].unsqueeze(0)
    pages = torch.zeros(nb + 2, layout.page_bytes, dtype=torch.uint8)
    pool = StagingPool(["l"], 2, B, H, D, torch.float32, paged=st, blocks=st.blocks)
    policy = make_policy(preset)
    out = torch.zeros(L, Hq, D)
    for a, b in schedule or [(0, prompt_len)] + [(t, t + 1) for t in range(prompt_len, L)]:
        plans = plan_step(pool, B, [0, b - a], [b], table)
        apply_step(pool, 0, plans, q[a:b], k[a:b], v[a:b], pages, layout, policy, scale, out[a:b])
    return out


@pytest.mark.parametrize("route", ["cpp", "torch"])
@pytest.mark.parametrize("preset_name,hq,hk,prompt_len", [("zipcache", 6, 2, 40), ("kivi3", 3, 3, 64)])
def test_8bit_staging_engine_equals_simulator(route, preset_name, hq, hk, prompt_len, monkeypatch):
    """``staging_bits: 8`` (the presets' default): the simulator rounds what the engine stages
    (prompt tails, decode tokens before their own query reads them) to the same 8 bits, so
    the engine's pooled, paged path and the simulator agree; and differ from staging in the
    model dtype. The prompt fits one block (the engine runs a longer chunk blockwise, the
    simulator as one window), then decode tokens fill two blocks."""
    monkeypatch.setenv("ZIPCACHE_VLLM_KERNELS", {"cpp": "", "torch": "torch"}[route])
    build.load()
    preset = make_policy(preset_name).preset.model_copy(update={"block_size": 64})
    assert preset.staging_bits == 8
    q, k, v = _inputs(prompt_len + 150, hq, hk, 7)
    scale = q.shape[-1] ** -0.5
    engine = _engine_pool_steps(q, k, v, preset, prompt_len, scale)
    torch.testing.assert_close(engine, _simulated(q, k, v, preset, prompt_len, scale),
                               rtol=1e-4, atol=1e-4)
    full = preset.model_copy(update={"staging_bits": None})
    assert not torch.allclose(engine, _simulated(q, k, v, full, prompt_len, scale), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("route", ["cpp", "torch"])
@pytest.mark.parametrize("preset_name,hq,hk,prompt_len", [("zipcache", 6, 2, 40), ("kivi3", 3, 3, 64),
                                                          ("zipcache_exact", 4, 2, 0)])
def test_a_delayed_block_in_the_engine_equals_the_simulator(route, preset_name, hq, hk,
                                                            prompt_len, monkeypatch):
    """``saliency_delay: 1``: the engine's pooled, paged path (a filled block kept in 8-bit
    staging until the next block fills, scored by that block's probe rows too, then packed
    and the run moved on) computes what the simulator computes with the same delay, and
    not what it computes without it."""
    monkeypatch.setenv("ZIPCACHE_VLLM_KERNELS", {"cpp": "", "torch": "torch"}[route])
    build.load()
    preset = make_policy(preset_name).preset.model_copy(update={"block_size": 64,
                                                                "saliency_delay": 1})
    q, k, v = _inputs(prompt_len + 230, hq, hk, 7)
    scale = q.shape[-1] ** -0.5
    schedule = ([(0, prompt_len)] if prompt_len else []) + [
        (t, t + 1) for t in range(prompt_len, prompt_len + 230)]
    engine = _engine_pool_steps(q, k, v, preset, prompt_len, scale, schedule)
    torch.testing.assert_close(engine, _simulated(q, k, v, preset, prompt_len, scale),
                               rtol=1e-4, atol=1e-4)
    undelayed = preset.model_copy(update={"saliency_delay": 0})
    assert not torch.allclose(engine, _simulated(q, k, v, undelayed, prompt_len, scale),
                              rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("schedule", [[(0, 100), (100, 101), (101, 230), (230, 231), (231, 300)],
                                      [(0, 64), (64, 128), (128, 129), (129, 300)],
                                      [(0, 300)]])
def test_a_delayed_block_is_the_same_however_the_request_is_split(schedule):
    """Chunks of any length (blockwise inside, a block packed when the block after it fills,
    the staged run moved to the next pages) give the outputs of one block per step."""
    preset = make_policy("zipcache").preset.model_copy(update={"block_size": 64,
                                                               "saliency_delay": 1})
    q, k, v = _inputs(300, 6, 2, 5)
    scale = q.shape[-1] ** -0.5
    blockwise = [(a, min(a + 64, 300)) for a in range(0, 300, 64)]
    torch.testing.assert_close(_engine_pool_steps(q, k, v, preset, 0, scale, schedule),
                               _engine_pool_steps(q, k, v, preset, 0, scale, blockwise),
                               rtol=1e-5, atol=1e-5)


def _windowed_engine_steps(q, k, v, preset, window, schedule, scale):
    """The engine's pooled, paged path for a sliding-window layer, as vLLM drives it: after
    every step the blocks that left every future window are freed, here pointed at a page
    of garbage (vLLM's null block), so a read of one shows."""
    L, Hq, D = q.shape
    H = k.shape[1]
    layout = BlockLayout.from_preset(preset, D, H)
    B = layout.block_size
    st = StagingLayout.of(layout, 4, preset.staging_bits, preset.staged_blocks)
    nb = -(-L // B) + st.lookahead_blocks
    table = (torch.randperm(nb + 2, generator=torch.Generator().manual_seed(1))[:nb] + 1).unsqueeze(0)
    pages = torch.zeros(nb + 3, layout.page_bytes, dtype=torch.uint8)
    pages[0] = torch.randint(0, 256, (layout.page_bytes,), dtype=torch.uint8)  # the null block
    pool = StagingPool(["l"], 2, B, H, D, torch.float32, paged=st, blocks=st.blocks)
    policy = make_policy(preset)
    out = torch.zeros(L, Hq, D)
    for a, b in schedule:
        plans = plan_step(pool, B, [0, b - a], [b], table)
        apply_step(pool, 0, plans, q[a:b], k[a:b], v[a:b], pages, layout, policy, scale, out[a:b],
                   sliding_window=window)
        table[0, :max(0, b - window + 1) // B] = 0  # SlidingWindowManager.remove_skipped_blocks
    return out


@pytest.mark.parametrize("delay", [0, 1])
@pytest.mark.parametrize("path", ["prefix", "kernels", "torch"])
@pytest.mark.parametrize("preset_name,hq,hk", [("zipcache", 4, 1), ("kivi3", 6, 2)])
def test_sliding_window_engine_equals_simulator(path, preset_name, hq, hk, delay, monkeypatch):
    """A sliding-window layer (Gemma 2/3, Mistral): decode rows in the fused kernel while
    the window covers the whole prefix and one at a time after, prefill chunks cut mid-block
    and longer than the window, decode far past it. Every query sees its window, partly packed
    (the block where it starts masked per query, storage order included), never a freed
    block; equal to the simulator with the same window, with a block packed when it fills or
    one block later. Paths: the dequantized prefix (CPU), the packed kernels with dequantized
    edge blocks (as on CUDA), the portable kernels."""
    monkeypatch.setenv("ZIPCACHE_VLLM_KERNELS", "torch" if path == "torch" else "")
    build.load()
    if path == "kernels":
        monkeypatch.setattr("zipcache_vllm.engine.step.uses_triton", lambda pages: True)
    preset = make_policy(preset_name).preset.model_copy(update={"block_size": 64,
                                                                "saliency_delay": delay})
    window, L = 200, 600
    q, k, v = _inputs(L, hq, hk, 5)
    scale = q.shape[-1] ** -0.5
    schedule = ([(0, 90)] + [(t, t + 1) for t in range(90, 230)]  # fused decode until ctx 200
                + [(230, 250), (250, 470)] + [(t, t + 1) for t in range(470, L)])
    engine = _windowed_engine_steps(q, k, v, preset, window, schedule, scale)
    sim = KVSimulator(make_policy(preset), SimConfig(prefill_len=0, chunk_size=64))
    ref, _ = sim(_Module(), *(x.transpose(0, 1).unsqueeze(0) for x in (q, k, v)), scaling=scale,
                 sliding_window=window)
    torch.testing.assert_close(engine, ref[0], rtol=1e-4, atol=1e-4)
    full, _ = sim(_Module(), *(x.transpose(0, 1).unsqueeze(0) for x in (q, k, v)), scaling=scale)
    assert not torch.allclose(engine[window:], full[0][window:], atol=1e-3)


@pytest.mark.parametrize("route", ["cpp", "torch"])
@pytest.mark.parametrize("delay,schedule", [
    (1, [(0, 40)] + [(t, t + 1) for t in range(40, 300)]),
    (1, [(0, 100), (100, 101), (101, 230), (230, 231), (231, 300)]),
    (0, [(0, 40)] + [(t, t + 1) for t in range(40, 200)]),
])
def test_staging_writes_only_the_blocks_vllm_allocated(route, delay, schedule, monkeypatch):
    """The block table grows as vLLM's does: each step's row holds the blocks of the
    request's tokens and ``lookahead_blocks`` more; the columns after them name a sentinel
    page (a block of another request). A run's pages past the ones its tokens reach are
    read, never written: the sentinel keeps its bytes, and the outputs are the simulator's."""
    monkeypatch.setenv("ZIPCACHE_VLLM_KERNELS", {"cpp": "", "torch": "torch"}[route])
    build.load()
    preset = make_policy("zipcache").preset.model_copy(update={"block_size": 64,
                                                               "saliency_delay": delay})
    L = schedule[-1][1]
    q, k, v = _inputs(L, 6, 2, 9)
    scale = q.shape[-1] ** -0.5
    layout = BlockLayout.from_preset(preset, 64, 2)
    B = layout.block_size
    st = StagingLayout.of(layout, 4, preset.staging_bits, preset.staged_blocks)
    ids = torch.randperm(40, generator=torch.Generator().manual_seed(2))[:-1] + 1
    pages = torch.zeros(41, layout.page_bytes, dtype=torch.uint8)
    pages[0] = torch.randint(0, 256, (layout.page_bytes,), dtype=torch.uint8)  # the sentinel
    sentinel = pages[0].clone()
    pool = StagingPool(["l"], 2, B, 2, 64, torch.float32, paged=st, blocks=st.blocks)
    policy = make_policy(preset)
    out = torch.zeros(L, 6, 64)
    for a, b in schedule:
        table = torch.zeros(1, 20, dtype=torch.int64)  # vLLM's row: unallocated columns stale
        allocated = -(-b // B) + st.lookahead_blocks
        table[0, :allocated] = ids[:allocated]
        plans = plan_step(pool, B, [0, b - a], [b], table)
        apply_step(pool, 0, plans, q[a:b], k[a:b], v[a:b], pages, layout, policy, scale, out[a:b])
    assert torch.equal(pages[0], sentinel)
    torch.testing.assert_close(out, _simulated(q, k, v, preset, 0, scale), rtol=1e-4, atol=1e-4)
