"""The capacity planner: vLLM's own arithmetic, reproduced exactly (no engine started here;
``test_planner_engine.py`` compares with a running engine's log)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from zipcache_vllm.cli import main as cli_main
from zipcache_vllm.config import CONFIG_DIR, list_presets, load_preset
from zipcache_vllm.planner import capacity as cap
from zipcache_vllm.planner.hardware import load_catalog
from zipcache_vllm.planner.model_spec import ModelSpecError, load_model_spec
from zipcache_vllm.planner.plan import PlanError, PlanRequest, make_plan
from zipcache_vllm.planner.report import markdown
from zipcache_vllm.dtypes import cache_dtypes

# Awkward on purpose: max_model_len not a multiple of any block size; TP that replicates KV
# heads (9 > 3 KV heads of SmolLM2); PP that splits 30 layers unevenly.
TOPOLOGIES = [(1, 1), (3, 1), (9, 1), (1, 4), (3, 2)]
MAX_MODEL_LENS = [2000, 2048]
BUDGETS_GIB = [1, 2]


def _all_dtypes() -> list[str]:
    return ["auto", "fp8", *sorted(cache_dtypes())]


# -- pure arithmetic ------------------------------------------------------------------------

def test_catalog_is_not_a_preset_and_presets_still_load():
    assert (CONFIG_DIR / "hardware" / "catalog.yaml").is_file()
    names = list_presets()
    assert "catalog" not in names and "hardware" not in names
    for name in names:
        assert load_preset(name).name == name
    catalog = load_catalog()
    assert {"H100-80GB", "A100-80GB", "L4-24GB"} <= set(catalog.gpus) and "cpu-dev" in catalog.cpus
    with pytest.raises(ValueError, match="H100-80GB"):
        catalog.lookup("H101")


def test_bundled_llama3_8b_architecture():
    spec = load_model_spec("llama3_8b")
    assert (spec.num_layers, spec.num_attention_heads, spec.num_kv_heads, spec.head_size) == (32, 32, 8, 128)
    assert (spec.hidden_size, spec.intermediate_size, spec.vocab_size) == (4096, 14336, 128256)
    assert spec.max_position_embeddings == 8192
    assert load_model_spec("llama3_1_8b").max_position_embeddings == 131072
    # Meta publishes 8.03B parameters for Llama-3-8B.
    assert spec.num_parameters() == pytest.approx(8.03e9, rel=0.001)
    with pytest.raises(ModelSpecError, match="llama3_8b"):
        load_model_spec("no-such-model")


def test_weights_estimate_matches_the_prepared_checkpoint(model_dir):
    """The parameter count (the GPU weights estimate) equals the real safetensors size."""
    spec = load_model_spec(model_dir)
    size = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    assert spec.num_parameters() * spec.dtype_bytes == pytest.approx(size, rel=0.001)


def test_cpu_plan_equals_the_measured_engine_capacity(model_dir):
    """At 2 GiB with --max-model-len 2048: 93,184 (auto) and 343,142 (zipcache) tokens, vLLM's
    count of 3,351 pages for requests of 16 + 4 staging blocks (the default's delayed block:
    StagingLayout.lookahead_blocks). The engine's own log is held to the planner in
    test_engine_e2e.py::test_capacity_vs_auto."""
    plan = make_plan(PlanRequest(model=str(model_dir), hardware="cpu-dev", kv_cache_space_gib=2,
                                 max_model_len=2048, kv_cache_dtypes=["auto", "zipcache"]))
    assert plan.row("auto").kv_tokens == 93_184
    assert plan.row("zipcache").kv_tokens == 343_142 == int(3351 / 20 * 2048)
    assert plan.row("zipcache").ratio_vs_auto == pytest.approx(343_142 / 93_184)
    assert plan.estimates is None  # CPU budgets are exact


def test_layers_and_heads_per_rank_follow_vllm():
    from vllm.distributed.utils import get_pp_indices

    for layers in (30, 32, 61):
        for pp in (1, 2, 3, 4, 7):
            expected = [b - a for a, b in (get_pp_indices(layers, r, pp) for r in range(pp))]
            assert cap.layers_per_stage(layers, pp) == expected
    assert [cap.kv_heads_per_rank(8, tp) for tp in (1, 2, 8, 16)] == [8, 4, 1, 1]


def test_bytes_per_token_parts_add_up():
    plan = make_plan(PlanRequest(model="llama3_8b", hardware="H100-80GB", max_model_len=8192,
                                 kv_cache_dtypes=_all_dtypes()))
    auto = plan.row("auto")
    assert auto.bytes_per_token == 32 * 8 * 128 * 2 * 2  # layers x KV heads x head x (K+V) x bf16
    assert plan.row("fp8").bytes_per_token == auto.bytes_per_token / 2
    for row in plan.rows:
        assert sum(row.parts_per_token_per_layer.values()) == pytest.approx(row.bytes_per_token_per_layer)
        assert row.bytes_per_token == pytest.approx(row.bytes_per_token_per_layer * 32)
        if row.preset:
            assert row.bytes_per_token < auto.bytes_per_token


def test_gpu_plan_states_estimates_and_tp_pp_split():
    one = make_plan(PlanRequest(model="llama3_1_8b", hardware="H100-80GB", max_model_len=32768, concurrency=16))
    two = make_plan(PlanRequest(model="llama3_1_8b", hardware="H100-80GB", max_model_len=32768, concurrency=16,
                                tensor_parallel_size=2))
    assert one.estimates.weights_source == "estimate"
    assert one.estimates.weights_gib == pytest.approx(8.03e9 * 2 / 2**30, rel=0.002)
    assert two.estimates.weights_gib == pytest.approx(one.estimates.weights_gib / 2, rel=0.001)
    assert two.kv_heads_per_rank == 4 and two.row("auto").bytes_per_token == one.row("auto").bytes_per_token
    for row in two.rows:
        # twice the GPUs, each with a larger budget: more than twice the tokens
        assert row.kv_tokens > 2 * one.row(row.cache_dtype).kv_tokens
    pp = make_plan(PlanRequest(model="llama3_1_8b", hardware="H100-80GB", max_model_len=32768,
                               tensor_parallel_size=2, pipeline_parallel_size=2))
    assert pp.layers_per_stage == [16, 16] and pp.workers == 4
    assert make_plan(PlanRequest(model="llama3_8b", hardware="H100-80GB", max_model_len=32768)).warnings


def test_staging_is_blocks_of_the_kv_cache_on_cpu_and_cuda(model_dir):
    """Paged staging: the same budget for every dtype; each running request holds the
    staging blocks ahead (4 for SmolLM2's default preset, its delayed block included), counted in concurrency."""
    for plan in (make_plan(PlanRequest(model=str(model_dir), hardware="cpu-dev", max_model_len=2048,
                                       context_len=512)),
                 make_plan(PlanRequest(model="llama3_1_8b", hardware="H100-80GB", max_model_len=32768,
                                       context_len=2048))):
        zc, auto = plan.row("zipcache"), plan.row("auto")
        assert zc.kv_budget_bytes == auto.kv_budget_bytes and auto.staging_blocks == 0
        fmt = cap.page_format("zipcache", plan.model["head_size"], plan.kv_heads_per_rank, 2, plan.device)
        assert zc.staging_blocks == fmt.staging_blocks > 0
        assert zc.staging_bytes_per_request == zc.staging_blocks * zc.page_bytes * max(plan.layers_per_stage)
        per_request = -(-plan.context_len // zc.block_size) + zc.staging_blocks
        assert zc.kv_requests_at_context == zc.num_blocks // per_request
        assert zc.max_num_seqs is None and zc.concurrency_at_context == zc.kv_requests_at_context
    assert make_plan(PlanRequest(model=str(model_dir), hardware="cpu-dev",
                                 max_model_len=2048)).row("zipcache").staging_blocks == 4


def test_bad_requests_name_the_field():
    with pytest.raises(ValueError, match="hardware"):
        PlanRequest(model="llama3_8b", hardware="TPU", max_model_len=8192)
    with pytest.raises(ValueError, match="zipcache_nope"):
        PlanRequest(model="llama3_8b", hardware="L4-24GB", max_model_len=8192, kv_cache_dtypes=["zipcache_nope"])
    with pytest.raises(PlanError) as err:
        make_plan(PlanRequest(model="llama3_8b", hardware="L4-24GB", max_model_len=8192, tensor_parallel_size=3))
    assert err.value.field == "tensor_parallel_size"


# -- against vLLM's own functions -----------------------------------------------------------

@pytest.fixture(scope="module")
def vllm_kv(model_dir):
    """vLLM's capacity for (dtype, tp, pp, budget GiB, max_model_len), through the functions the
    engine core calls: an engine config from EngineArgs, per-worker layer specs customized by the
    backend, resolve_kv_cache_layout, get_kv_cache_configs, generate_scheduler_kv_cache_config, get_kv_cache_capacity."""
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    from vllm.v1.attention.backends.utils import get_supported_kv_cache_layouts, resolve_kv_cache_layout
    from vllm.v1.core.kv_cache_utils import (
        generate_scheduler_kv_cache_config,
        get_kv_cache_capacity,
        get_kv_cache_configs,
    )
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.worker.utils import customize_attention_spec

    from zipcache_vllm.vllm_plugin import backend, plugin

    plugin.register()

    def run(dtype: str, tp: int, pp: int, gib: int, max_model_len: int, block_size: int | None = None,
            budget_bytes: int | None = None) -> tuple[int, int, float]:
        old = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(gib)
        try:
            cfg = EngineArgs(model=str(model_dir), skip_tokenizer_init=True, max_model_len=max_model_len,
                             kv_cache_dtype=dtype, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                             enforce_eager=True).create_engine_config()
        finally:
            if old is None:
                del os.environ["VLLM_CPU_KVCACHE_SPACE"]
            else:
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = old
        mc, par = cfg.model_config, cfg.parallel_config
        heads, head_size = mc.get_num_kv_heads(par), mc.get_head_size()
        kv_dtype = kv_cache_dtype_str_to_dtype(dtype, mc)
        attn = backend.ZipCacheBackend if backend.is_zipcache_dtype(dtype) else CPUAttentionBackend
        specs, avail = [], []
        for stage, n in enumerate(cap.layers_per_stage(mc.get_total_num_hidden_layers(), pp)):
            first = sum(cap.layers_per_stage(mc.get_total_num_hidden_layers(), pp)[:stage])
            with set_current_vllm_config(cfg):
                spec = customize_attention_spec(attn, FullAttentionSpec(
                    block_size=block_size or cfg.cache_config.block_size, num_kv_heads=heads,
                    head_size=head_size, dtype=kv_dtype))
            layers = {f"model.layers.{first + i}.self_attn.attn": spec for i in range(n)}
            for _ in range(tp):
                specs.append(layers)
                avail.append(budget_bytes or cfg.cache_config.kv_cache_memory_bytes)
        names = [layout.name for layout in get_supported_kv_cache_layouts([attn])]
        resolve_kv_cache_layout(cfg, [names] * len(specs), [s for w in specs for s in w.values()])
        sched = generate_scheduler_kv_cache_config(get_kv_cache_configs(cfg, specs, avail))
        tokens, conc = get_kv_cache_capacity(cfg, sched)
        return sched.num_blocks, tokens, conc

    return run


@pytest.mark.parametrize("tp,pp", TOPOLOGIES)
def test_planner_equals_vllm_kv_cache_utils(vllm_kv, model_dir, tp, pp):
    dtypes = _all_dtypes()
    for gib in BUDGETS_GIB:
        for mml in MAX_MODEL_LENS:
            plan = make_plan(PlanRequest(model=str(model_dir), hardware="cpu-dev", kv_cache_space_gib=gib,
                                         max_model_len=mml, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                                         kv_cache_dtypes=dtypes))
            for row in plan.rows:
                blocks, tokens, conc = vllm_kv(row.cache_dtype, tp, pp, gib, mml)
                assert (row.num_blocks, row.kv_tokens) == (blocks, tokens), (row.cache_dtype, gib, mml)
                assert row.max_concurrency == pytest.approx(conc)


@pytest.mark.parametrize("tp,pp", [(1, 1), (3, 2)])
def test_gpu_block_size_and_budgets_equal_vllm(vllm_kv, model_dir, tp, pp):
    """GPU defaults (block size 16) and odd byte budgets go through the same vLLM functions."""
    spec = load_model_spec(model_dir)
    stages = cap.layers_per_stage(spec.num_layers, pp)
    for dtype in ("auto", "fp8"):
        fmt = cap.page_format(dtype, spec.head_size, cap.kv_heads_per_rank(spec.num_kv_heads, tp), 2, "gpu")
        assert fmt.block_size == 16
        for budget in (123_456_789, 5 * 2**30 + 17):
            ours = cap.engine_capacity(fmt, [budget] * pp, stages, 1000)
            assert (ours.num_blocks, ours.kv_tokens) == vllm_kv(dtype, tp, pp, 1, 1000, 16, budget)[:2]


def test_hybrid_sliding_window_planner_equals_vllm(gemma_dir):
    """Gemma 3 (15 sliding-window layers of 512 tokens, 3 full): the KV-cache groups vLLM
    makes of the layers' specs (sliding layers in zipcache pages too), and the blocks,
    tokens and concurrency it computes, at several budgets, lengths and token budgets."""
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.core.kv_cache_utils import (generate_scheduler_kv_cache_config,
                                             get_kv_cache_capacity, get_kv_cache_configs)
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    from vllm.v1.attention.backends.utils import get_supported_kv_cache_layouts, resolve_kv_cache_layout
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    from zipcache_vllm.config import load_preset
    from zipcache_vllm.dtypes import cache_dtypes
    from zipcache_vllm.vllm_plugin import backend, plugin

    plugin.register()
    spec = load_model_spec(gemma_dir)
    assert spec.is_hybrid and spec.layer_windows.count(512) == 15
    assert cap.Groups.of(spec.layer_windows) == cap.Groups(3, (512,) * 5 + (None,))
    assert cap.Groups.of([None] * 13 + [128] * 12) == cap.Groups(13, (None, 128))  # gpt-oss-like
    # Every preset a window allows (FastGen is refused with one): the three layouts of the
    # main presets at several settings, the others at the engine eval's.
    allowed = [d for d, name in cache_dtypes().items() if not load_preset(name).paged_fastgen]
    assert {"zipcache", "zipcache_hc", "zipcache_uniform3"} <= set(allowed)
    for dtype in ("auto", *allowed):
        main = dtype in ("auto", "zipcache", "zipcache_hc")
        for gib, mml, batched in ((1, 4096, 2048), (1, 32768, 4096), (3, 1000, 256)) if main else ((1, 2049, 256),):
            cfg = EngineArgs(model=str(gemma_dir), skip_tokenizer_init=True, max_model_len=mml,
                             kv_cache_dtype=dtype, max_num_batched_tokens=batched,
                             enforce_eager=True).create_engine_config()
            B = cfg.cache_config.block_size
            elt = torch.bfloat16 if dtype == "auto" else torch.uint8
            with set_current_vllm_config(cfg):
                full = FullAttentionSpec(block_size=B, num_kv_heads=1, head_size=256, dtype=elt)
                sliding = SlidingWindowSpec(block_size=B, num_kv_heads=1, head_size=256, dtype=elt,
                                            sliding_window=512)
                if dtype != "auto":
                    full, sliding = (backend.backend_for(dtype).customize_spec(s)
                                     for s in (full, sliding))
            layers = {f"model.layers.{i}.self_attn.attn": sliding if w else full
                      for i, w in enumerate(spec.layer_windows)}
            attn = backend.ZipCacheBackend if dtype != "auto" else CPUAttentionBackend
            names = [layout.name for layout in get_supported_kv_cache_layouts([attn])]
            resolve_kv_cache_layout(cfg, [names], list(layers.values()))
            sched = generate_scheduler_kv_cache_config(
                get_kv_cache_configs(cfg, [layers], [gib * 2**30]))
            tokens, conc = get_kv_cache_capacity(cfg, sched)
            assert len(sched.kv_cache_groups) == 6
            row = make_plan(PlanRequest(model=str(gemma_dir), hardware="cpu-dev", kv_cache_space_gib=gib,
                                        max_model_len=mml, max_num_batched_tokens=batched,
                                        kv_cache_dtypes=[dtype])).row(dtype)
            assert (row.num_blocks, row.kv_tokens) == (sched.num_blocks, tokens), (dtype, gib, mml)
            assert row.max_concurrency == pytest.approx(conc)


def test_page_bytes_equal_the_backend_spec():
    """For every zipcache dtype and head count the planner's page is the backend's declared page."""
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from zipcache_vllm.vllm_plugin import backend

    for dtype in sorted(cache_dtypes()):
        # the backend class the router gives a worker's layers of this dtype
        dtype_backend = backend.backend_for(dtype)
        block = backend.preset_for_dtype(dtype).block_size
        for heads, head_size in ((1, 64), (3, 64), (8, 128)):
            spec = dtype_backend.customize_spec(FullAttentionSpec(
                block_size=block, num_kv_heads=heads, head_size=head_size, dtype=torch.uint8))
            fmt = cap.page_format(dtype, head_size, heads, 2, "cpu")
            assert (fmt.page_bytes, fmt.staging_blocks) == (spec.page_size_bytes, spec.staging_blocks)
            f32 = backend.backend_for(dtype, 4).customize_spec(FullAttentionSpec(
                block_size=block, num_kv_heads=heads, head_size=head_size, dtype=torch.uint8))
            assert cap.page_format(dtype, head_size, heads, 4, "cpu").staging_blocks == f32.staging_blocks


# -- CLI ------------------------------------------------------------------------------------

def test_cli_plan_table_json_plot(tmp_path, capsys):
    out = tmp_path / "plan.json"
    png = tmp_path / "plan.png"
    assert cli_main(["plan", "--model", "llama3_1_8b", "--hardware", "H100-80GB", "-tp", "2",
                     "--max-model-len", "32768", "--concurrency", "16", "--json", str(out),
                     "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "ESTIMATE" in text and "| zipcache |" in text and "| auto |" in text
    data = json.loads(out.read_text())
    assert {r["cache_dtype"] for r in data["rows"]} >= {"auto", "fp8", "zipcache"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert cli_main(["plan", "--model", "llama3_8b", "--hardware", "nope", "--max-model-len", "8"]) == 2
    assert "nope" in capsys.readouterr().err


def test_cli_errors_name_flags_not_fields(capsys):
    """Bad values come back as one line per problem naming the CLI flag (no pydantic dump)."""
    base = ["plan", "--model", "llama3_8b", "--hardware", "L4-24GB"]
    cases = [
        (["--max-model-len", "0"], "error: --max-model-len: input should be greater than 0 (got 0)"),
        (["--max-model-len", "500", "--context-len", "900"],
         "error: --context-len (900) exceeds --max-model-len (500)"),
        (["--max-model-len", "500", "--kv-cache-dtype", "auto,nope"],
         "error: --kv-cache-dtype: unknown --kv-cache-dtype"),
        (["--max-model-len", "500", "-tp", "3"], "error: --tensor-parallel-size: 3 must divide"),
        (["--max-model-len", "500", "--gpu-memory-utilization", "1.5"],
         "error: --gpu-memory-utilization: input should"),
    ]
    for extra, expected in cases:
        assert cli_main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(expected), err
        assert "validation error" not in err and "For further information" not in err and "_" not in err.split(":")[1]


def test_vllm_flag_names_and_sizes():
    """-tp/-pp, --kv-cache-dtype and vLLM's size suffixes (1G = 2**30, 1g = 10**9) as vLLM reads them."""
    import argparse

    from vllm.utils.argparse_utils import human_readable_int as vllm_parse

    from zipcache_vllm.planner.units import format_bytes, human_readable_int

    for text in ("0", "512", "1k", "1K", "25.6k", "2G", "1g", "136M", "3T", "0.5m"):
        assert human_readable_int(text) == vllm_parse(text), text
    for bad in ("1.5G", "two", "1Gi"):
        with pytest.raises(argparse.ArgumentTypeError):
            human_readable_int(bad)
    for n in (2**30, 136 * 2**20, 123_456_789, 5 * 2**40):
        assert human_readable_int(format_bytes(n)) == n
    from zipcache_vllm.cli import build_parser

    args = build_parser().parse_args(["plan", "--model", "m", "--hardware", "h", "--max-model-len", "32K",
                                      "-tp", "2", "-pp", "3", "--kv-cache-memory-bytes", "40G",
                                      "--kv-cache-dtype", "auto,zipcache"])
    assert (args.max_model_len, args.tensor_parallel_size, args.pipeline_parallel_size) == (32768, 2, 3)
    assert args.kv_cache_memory_bytes == 40 * 2**30 and args.kv_cache_dtype == "auto,zipcache"


def test_kv_cache_memory_bytes_is_the_exact_budget(model_dir):
    """CPU: the same budget as VLLM_CPU_KVCACHE_SPACE in bytes; GPU: replaces the estimate."""
    by_env = make_plan(PlanRequest(model=str(model_dir), hardware="cpu-dev", kv_cache_space_gib=2, max_model_len=2048))
    by_flag = make_plan(PlanRequest(model=str(model_dir), hardware="cpu-dev", kv_cache_memory_bytes=2 * 2**30,
                                    max_model_len=2048))
    assert [r.kv_tokens for r in by_flag.rows] == [r.kv_tokens for r in by_env.rows]
    with pytest.raises(ValueError, match="once"):
        PlanRequest(model="llama3_8b", hardware="cpu-dev", max_model_len=2048, kv_cache_space_gib=2,
                    kv_cache_memory_bytes=2**30)
    gpu = make_plan(PlanRequest(model="llama3_1_8b", hardware="H100-80GB", max_model_len=32768,
                                kv_cache_memory_bytes=40 * 2**30))
    assert gpu.estimates.kv_budget_source == "given" and gpu.estimates.kv_budget_gib == 40
    fmt = cap.page_format("auto", 128, 8, 2, "gpu")
    assert gpu.row("auto").num_blocks == 40 * 2**30 // (32 * fmt.page_bytes)
    assert "--kv-cache-memory-bytes" in markdown(gpu) and not gpu.warnings
    over = make_plan(PlanRequest(model="llama3_1_8b", hardware="L4-24GB", max_model_len=8192,
                                 kv_cache_memory_bytes=20 * 2**30))
    assert any("run out of memory" in w for w in over.warnings)


def test_a_length_beyond_the_model_is_refused():
    """vLLM refuses --max-model-len above max_position_embeddings (times the RoPE factor of the
    types it scales by): no row starts, the table says why."""
    from zipcache_vllm.planner.model_spec import spec_from_config

    plan = make_plan(PlanRequest(model="llama3_8b", hardware="H100-80GB", max_model_len=8193))
    assert plan.max_model_len_limit == 8192
    assert not any(r.starts or r.fits for r in plan.rows) and all(r.kv_requests_at_context == 0 for r in plan.rows)
    assert "8192 positions" in plan.warnings[0] and "vLLM refuses max_model_len" in markdown(plan)
    assert all(r.starts for r in make_plan(PlanRequest(model="llama3_8b", hardware="H100-80GB",
                                                       max_model_len=8192)).rows)
    # Llama-3.1's rope_type llama3 is already scaled in its 131072; linear scaling multiplies
    assert load_model_spec("llama3_1_8b").derived_max_model_len == 131072
    cfg = json.loads((CONFIG_DIR / "models" / "llama3_8b.json").read_text())
    assert spec_from_config(cfg | {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}).derived_max_model_len == \
        4 * 8192
    assert spec_from_config(cfg | {"rope_scaling": {"type": "yarn", "factor": 4.0}}).derived_max_model_len == 8192


def test_planned_max_num_seqs():
    """--max-num-seqs given: kept; --concurrency: the target; neither: the most requests of the
    context that fit with their staging blocks, capped by vLLM's default for the hardware."""
    from zipcache_vllm.planner.plan import planned_max_num_seqs

    req = PlanRequest(model="llama3_1_8b", hardware="H100-80GB", max_model_len=32768)
    n = planned_max_num_seqs(req, "zipcache")
    assert n == make_plan(req.model_copy(update={"max_num_seqs": n})).row("zipcache").kv_requests_at_context == 63
    assert make_plan(req.model_copy(update={"max_num_seqs": n + 1})).row("zipcache").kv_requests_at_context < n + 1
    assert planned_max_num_seqs(req.model_copy(update={"concurrency": 10}), "zipcache") == 10
    assert planned_max_num_seqs(req.model_copy(update={"max_num_seqs": 3}), "auto") == 3
    short = req.model_copy(update={"context_len": 256})  # thousands fit: vLLM's default (1024) caps
    assert planned_max_num_seqs(short, "auto") == 1024
    # CPU: the same search (no sampler rows in the budget)
    cpu = PlanRequest(model="llama3_1_8b", hardware="cpu-dev", max_model_len=4096)
    n = planned_max_num_seqs(cpu, "zipcache")
    row = make_plan(cpu.model_copy(update={"max_num_seqs": n})).row("zipcache")
    assert row.kv_requests_at_context >= n and row.fits
    assert make_plan(cpu.model_copy(update={"max_num_seqs": n + 1})).row("zipcache").kv_requests_at_context < n + 1


@pytest.mark.parametrize("name,memory_gib", [("H100-80GB", 79.19), ("A100-80GB", 79.15), ("L4-24GB", 22.03),
                                             ("H200-141GB", 139.8), ("B200", 178.0), ("cpu-dev", None)])
def test_default_max_num_seqs_is_vllm_s(monkeypatch, name, memory_gib):
    """vllm_default_max_num_seqs equals EngineArgs.get_batch_defaults for `vllm serve`."""
    from types import SimpleNamespace

    from vllm.engine import arg_utils
    from vllm.usage.usage_lib import UsageContext

    from zipcache_vllm.planner.hardware import CPU, GPU
    from zipcache_vllm.planner.plan import vllm_default_max_num_seqs

    if memory_gib is None:
        hw = load_catalog().lookup(name)
        assert isinstance(hw, CPU)
    else:
        hw = GPU(description=name, memory_gib=memory_gib, bandwidth_gbs=1000)
        monkeypatch.setattr(arg_utils, "current_platform", SimpleNamespace(
            get_device_total_memory=lambda: int(memory_gib * 2**30), get_device_name=lambda: f"NVIDIA {name}",
            is_tpu=lambda: False, is_cpu=lambda: False))
    for workers in (1, 4):
        _, seqs = arg_utils.EngineArgs.get_batch_defaults(workers)
        assert vllm_default_max_num_seqs(name, hw, workers) == seqs[UsageContext.OPENAI_API_SERVER]


def test_layout_command_still_works(capsys):
    assert cli_main(["layout"]) == 0
    assert "| zipcache |" in capsys.readouterr().out


def test_cli_module_stays_light():
    """Building the parser (layout + plan) imports no torch, vLLM or matplotlib."""
    code = ("import sys; from zipcache_vllm.cli import build_parser; build_parser(); "
            "print([m for m in ('torch', 'vllm', 'transformers', 'matplotlib') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
