"""The vLLM internals the plugin patches or reads still have the shape we assume.

If vLLM moves any of these, this file fails first and names the target (rather
than an engine dying at startup or, worse, serving garbage).
"""
from __future__ import annotations

import inspect
import os
import pickle
import subprocess
import sys
import typing

import pytest
import torch

vllm = pytest.importorskip("vllm")


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_vllm_version_is_supported():
    from zipcache_vllm.vllm_plugin import compat, plugin
    lo, hi = compat.SUPPORTED_VLLM
    major, minor = (int(x) for x in vllm.__version__.split(".")[:2])
    assert lo <= (major, minor) < hi
    assert plugin.vllm_version_problem() is None


@pytest.mark.parametrize("version,ok", [
    ("0.32.0", True), ("0.32.3+cpu", True), ("0.32.1.dev7+g1234abc", True),
    ("0.33.0", False), ("0.31.9", False), ("1.32.0", False), ("0.33.0rc1", False), ("nightly", False),
])
def test_version_check(version, ok):
    from zipcache_vllm.vllm_plugin.plugin import supported_range, vllm_version_problem

    problem = vllm_version_problem(version)
    assert (problem is None) == ok
    if not ok:
        assert problem == f"zipcache_vllm supports vLLM {supported_range()}, found {version}"
        assert supported_range() == "0.32.x"


@pytest.mark.parametrize("argv,found", [
    (["serve", "m", "--kv-cache-dtype", "zipcache"], "zipcache"),
    (["serve", "m", "--kv-cache-dtype=zipcache_hc"], "zipcache_hc"),
    (["serve", "m", "--kv_cache_dtype", "zipcache_kivi2"], "zipcache_kivi2"),
    (["serve", "m", "--kv-cache-dtype", "auto"], None),
    (["serve", "zipcache", "--kv-cache-dtype"], None),
    (["serve", "m"], None),
])
def test_requested_zipcache_dtype_reads_both_spellings(argv, found):
    from zipcache_vllm.vllm_plugin.plugin import requested_zipcache_dtype

    assert requested_zipcache_dtype(argv) == found


# A process that loads vLLM's plugins the way `vllm serve` does (building the engine-args
# parser), on a vLLM that claims to be 0.33.0, then parses ARGV and builds the engine config
# (model, cache, scheduler, platform checks: everything short of starting the engine).
_FAKE_VERSION_SCRIPT = """
import sys, typing
import vllm
vllm.__version__ = "0.33.0"
argv = sys.argv[1:]
sys.argv = ["vllm", "serve", *argv]
from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
import vllm.config.cache as cache
assert not any(n.startswith("zipcache") for n in typing.get_args(cache.CacheDType)), "patched"
config = EngineArgs.from_cli_args(parser.parse_args(argv)).create_engine_config()
print("CONFIG kv_cache_dtype=" + config.cache_config.cache_dtype)
"""


def _run_with_vllm_0_33(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _FAKE_VERSION_SCRIPT, *argv], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "VLLM_PLUGINS": "zipcache"})


def test_unsupported_vllm_serves_its_own_dtypes_with_one_warning(model_dir):
    """Acceptance (issue 23): on another vLLM minor version the plugin patches nothing and
    warns once; --kv-cache-dtype auto parses and its engine config builds."""
    r = _run_with_vllm_0_33("--model", str(model_dir), "--kv-cache-dtype", "auto", "--max-model-len", "512")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "CONFIG kv_cache_dtype=auto" in r.stdout
    assert out.count("zipcache_vllm supports vLLM 0.32.x, found 0.33.0: plugin disabled") == 1, out[-4000:]


def test_unsupported_vllm_refuses_zipcache_naming_the_supported_range(model_dir):
    r = _run_with_vllm_0_33("--model", str(model_dir), "--kv-cache-dtype", "zipcache_hc")
    assert r.returncode == 2, (r.stdout + r.stderr)[-4000:]
    assert ("error: --kv-cache-dtype zipcache_hc: zipcache_vllm supports vLLM 0.32.x, found 0.33.0"
            in r.stderr), r.stderr[-4000:]
    assert "CONFIG" not in r.stdout


def test_unsupported_vllm_leaves_endpoints_and_metrics_inert(monkeypatch):
    from fastapi import FastAPI

    from zipcache_vllm.vllm_plugin.endpoints import ZipCacheEndpoints
    from zipcache_vllm.vllm_plugin.metrics import ZipCacheStatLogger

    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    app = FastAPI()
    before = len(app.routes)
    ZipCacheEndpoints().attach_router(app)
    assert len(app.routes) == before
    stat_logger = ZipCacheStatLogger(vllm_config=None)  # would raise if it read the config
    stat_logger.log_engine_initialized()
    stat_logger.record(None, None)
    assert not stat_logger.active


def test_patch_targets_have_the_expected_shape():
    from vllm.config.cache import CacheConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.attention.selector import AttentionSelectorConfig
    from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from zipcache_vllm.vllm_plugin import compat

    t = compat.patch_targets()
    # Cache dtype: a Literal in two modules, a pydantic field, a cached argparse helper.
    assert typing.get_origin(t["CacheDType"]) is typing.Literal
    assert {"auto", "fp8"} <= set(typing.get_args(t["CacheDType"]))
    assert typing.get_origin(t["selector.CacheDType"]) is typing.Literal
    assert t["CacheConfig.cache_dtype"].name == "cache_dtype"
    assert hasattr(CacheConfig, "__pydantic_fields__")
    assert callable(getattr(t["_compute_kwargs"], "cache_clear", None))
    assert isinstance(t["STR_DTYPE_TO_TORCH_DTYPE"], dict)
    assert t["STR_DTYPE_TO_TORCH_DTYPE"]["fp8"] is torch.uint8
    # Platform hooks (classmethods: no cls in the bound signature).
    assert _params(t["CpuPlatform.get_attn_backend_cls"]) == [
        "selected_backend", "attn_selector_config", "num_heads"]
    assert _params(t["CpuPlatform.check_and_update_config"]) == ["vllm_config"]
    assert {"kv_cache_dtype", "head_size", "dtype", "use_mla", "use_sparse", "has_sink",
            "has_sliding_window", "attn_type", "block_size"} <= set(AttentionSelectorConfig._fields)
    assert "max_num_seqs" in EngineArgs.__dataclass_fields__
    assert "kv_cache_dtype" in EngineArgs.__dataclass_fields__
    # The KV-cache spec registry and what ZipCacheSpec / ZipCacheManager override.
    assert _params(t["KVCacheSpecRegistry._ensure_registered"]) == ["vllm_config"]
    assert _params(t["FullAttentionManager.get_num_blocks_to_allocate"])[:3] == [
        "self", "request_id", "num_tokens"]
    assert _params(t["FullAttentionManager.allocate_new_blocks"]) == [
        "self", "request_id", "num_tokens", "num_tokens_main_model"]
    assert _params(t["FullAttentionSpec.max_num_blocks_per_req"]) == ["self", "vllm_config", "max_len"]
    # a delayed block is offered to the prefix cache by its token count (ZipCacheManager)
    from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager
    for manager in ("FullAttentionManager", "SlidingWindowManager"):
        assert _params(t[f"{manager}.cache_blocks"])[:3] == ["self", "request", "num_tokens"]
    assert "num_tokens // self.block_size" in inspect.getsource(SingleTypeKVCacheManager.cache_blocks)
    # Runner lifecycle hooks.
    assert _params(GPUModelRunner._on_request_state_removed) == ["self", "req_id", "req_state"]
    assert _params(GPUModelRunner._update_states) == ["self", "scheduler_output"]
    runner_init = inspect.getsource(GPUModelRunner.__init__)  # what the hooks read off the runner
    assert "self.vllm_config = vllm_config" in runner_init and "self.requests:" in runner_init
    assert {"finished_req_ids", "preempted_req_ids"} <= set(SchedulerOutput.__dataclass_fields__)
    assert "resumed_req_ids" in CachedRequestData.__dataclass_fields__


def test_cpu_attention_refusal_follows_vllm():
    """The bench asks vLLM's own CPU check: fp8 is refused exactly without AVX-512 or AMX,
    bf16 never; a head size vLLM's fp8 path cannot tile is refused everywhere."""
    from zipcache_vllm.vllm_plugin.compat import cpu_attention_refusal

    assert cpu_attention_refusal("auto", 64) is None
    fp8_ok = torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()
    why = cpu_attention_refusal("fp8", 64)
    assert (why is None) == fp8_ok
    if why is not None:
        assert "AVX-512" in why
    assert "head_size" in cpu_attention_refusal("fp8", 80)


def test_spec_and_metadata_fields_we_use():
    from vllm.v1.attention.backend import CommonAttentionMetadata
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.kv_cache_interface import AttentionSpec

    fields = AttentionSpec.__dataclass_fields__
    assert {"state_content_bytes", "num_head_slots", "tokens_per_state",
            "page_size_padded"} <= set(fields)
    assert {"query_start_loc_cpu", "seq_lens", "block_table_tensor", "num_reqs",
            "num_actual_tokens"} <= set(CommonAttentionMetadata.__dataclass_fields__)
    assert "CUSTOM" in AttentionBackendEnum.__members__


def test_importing_the_package_patches_nothing():
    code = (
        "import sys, zipcache_vllm, zipcache_vllm.vllm_plugin, zipcache_vllm.vllm_plugin.plugin\n"
        "import zipcache_vllm.dtypes\n"
        "assert 'vllm' not in sys.modules, 'importing the plugin imported vllm'\n"
        "import typing, vllm.config.cache as c\n"
        "assert not any(n.startswith('zipcache') for n in typing.get_args(c.CacheDType))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def registered():
    from zipcache_vllm.vllm_plugin.plugin import register
    register()
    return register


def test_register_is_idempotent(registered):
    from vllm.config.cache import CacheDType
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from zipcache_vllm.vllm_plugin import compat, plugin
    before = (CpuPlatform.get_attn_backend_cls.__func__, GPUModelRunner._update_states,
              typing.get_args(CacheDType))
    plugin._registered = False  # force the patch functions themselves to run again
    registered()
    from vllm.config.cache import CacheDType as again
    after = (CpuPlatform.get_attn_backend_cls.__func__, GPUModelRunner._update_states,
             typing.get_args(again))
    assert before == after
    names = typing.get_args(again)
    assert len(names) == len(set(names))
    compat.patch_cache_dtypes(["zipcache"])
    assert typing.get_args(compat._cache_cfg_mod.CacheDType) == names


def test_dtype_names_are_legal_everywhere(registered):
    import vllm.v1.attention.selector as selector
    from vllm.config.cache import CacheConfig
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    from zipcache_vllm.dtypes import cache_dtypes
    names = cache_dtypes()
    assert {"zipcache", "zipcache_hc", "zipcache_kivi2"} <= set(names)
    for name in names:
        assert name in typing.get_args(selector.CacheDType)
        assert STR_DTYPE_TO_TORCH_DTYPE[name] is torch.uint8
        assert CacheConfig(cache_dtype=name).cache_dtype == name


def test_cli_accepts_presets_and_lists_them_for_unknown_names(registered, capsys):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--kv-cache-dtype", "zipcache_kivi2"])
    assert args.kv_cache_dtype == "zipcache_kivi2"
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "zipcache_nope"])
    err = capsys.readouterr().err
    assert "zipcache_nope" in err and "zipcache_hc" in err


def test_routing_and_clear_rejections(registered):
    from vllm.platforms.cpu import CpuPlatform
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.attention.selector import AttentionSelectorConfig

    from zipcache_vllm.vllm_plugin import backend

    def select(**kw):
        cfg = AttentionSelectorConfig(head_size=kw.pop("head_size", 64), dtype=torch.bfloat16,
                                      kv_cache_dtype=kw.pop("dtype", "zipcache"),
                                      block_size=None, **kw)
        return CpuPlatform.get_attn_backend_cls(None, cfg)

    assert select() == backend.backend_path("zipcache")
    assert select(dtype="zipcache_kivi2") == backend.backend_path("zipcache_kivi2")
    # vLLM imports the class by that name; it carries the dtype and is one class per dtype
    cls = resolve_obj_by_qualname(select(dtype="zipcache_kivi2"))
    assert issubclass(cls, backend.ZipCacheBackend) and cls.cache_dtype == "zipcache_kivi2"
    assert cls is backend.backend_for("zipcache_kivi2") is pickle.loads(pickle.dumps(cls))
    assert backend.ZipCacheBackend.cache_dtype is None
    assert not hasattr(backend, "ZipCacheBackend_zipcache_nope")
    assert "cpu_attn" in select(dtype="auto").lower()
    with pytest.raises(ValueError, match="head size 80"):
        select(head_size=80)
    with pytest.raises(ValueError, match="MLA"):
        select(use_mla=True)
    # sliding-window layers are served (their window is checked against the page size by the
    # impl and by update_vllm_config: test_unsupported_features_are_refused_with_the_reason)
    assert select(has_sliding_window=True) == backend.backend_path("zipcache")
    for kw, reason in (({"has_sink": True}, "attention sinks"), ({"use_sparse": True}, "sparse"),
                       ({"attn_type": "encoder_only"}, "only decoder self-attention"),
                       ({"head_size": 96}, "head size 96")):
        with pytest.raises(ValueError, match=reason) as err:
            select(**kw)
        assert "--kv-cache-dtype auto" in str(err.value)
    with pytest.raises(ValueError, match="valid: "):
        select(dtype="zipcache_nope")


def test_unsupported_features_are_refused_with_the_reason(registered):
    """What zipcache does not serve is refused at startup, naming the feature and the fix:
    per layer (the impl vLLM builds for each attention layer) and per model (the config
    check)."""
    from types import SimpleNamespace

    from zipcache_vllm.vllm_plugin import backend

    def impl(**kw):
        args = dict(num_heads=4, head_size=256, scale=0.0625, num_kv_heads=1, alibi_slopes=None,
                    sliding_window=None, kv_cache_dtype="zipcache")
        return backend.ZipCacheImpl(**(args | kw))

    assert impl(sliding_window=512).sliding_window == 512
    for kw, reason in (({"alibi_slopes": torch.ones(4)}, "ALiBi"),
                       ({"sliding_window": 128}, "sliding window of 128 tokens with 128-token pages"),
                       ({"sliding_window": 512, "kv_cache_dtype": "zipcache_fastgen"},
                        "sliding windows with a FastGen preset"),
                       ({"logits_soft_cap": 30.0}, "logits soft cap"),
                       ({"sinks": torch.zeros(4)}, "attention sinks"),
                       ({"kv_sharing_target_layer_name": "model.layers.0.self_attn.attn"},
                        "cross-layer KV sharing"),
                       ({"attn_type": "encoder_decoder"}, "attention type encoder_decoder"),
                       ({"head_size": 80}, "head size in")):
        with pytest.raises(NotImplementedError, match=reason):
            impl(**kw)

    def config(dtype="zipcache", window=None, **model):
        return SimpleNamespace(
            cache_config=SimpleNamespace(cache_dtype=dtype, user_specified_block_size=False,
                                         block_size=16, prefix_match_unit=None,
                                         kv_cache_dtype_skip_layers=None,
                                         enable_prefix_caching=False),
            speculative_config=None,
            model_config=SimpleNamespace(get_sliding_window=lambda: window, **model))

    backend.update_vllm_config(config(window=512))  # Gemma 3: served
    for cfg, reasons in ((config(window=100), ("sliding window (100 tokens)", "--kv-cache-dtype auto")),
                         (config("zipcache_fastgen", 512), ("FastGen", "--kv-cache-dtype zipcache")),
                         (config(use_mla=True), ("MLA", "--kv-cache-dtype auto"))):
        with pytest.raises(ValueError) as err:
            backend.update_vllm_config(cfg)
        assert all(r in str(err.value) for r in reasons), str(err.value)


def test_sliding_window_layers_declare_zipcache_pages(registered):
    """Why ``compat.patch_sliding_window_spec`` exists: vLLM's own
    ``Attention.get_kv_cache_spec`` returns a plain ``SlidingWindowSpec`` (one byte per
    element of our uint8 dtype) for a sliding-window layer whatever the backend's
    ``customize_spec`` says; patched, the layer declares the same zipcache pages and
    staging blocks as a full-attention layer, with its window."""
    from types import SimpleNamespace

    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    from zipcache_vllm.vllm_plugin import backend
    from zipcache_vllm.vllm_plugin.kv_spec import ZipCacheSlidingSpec, ZipCacheSpec

    cls = backend.backend_for("zipcache")
    layer = SimpleNamespace(sliding_window=512, attn_backend=cls, num_kv_heads=1, head_size=256,
                            head_size_v=256, kv_cache_torch_dtype=torch.uint8, kv_cache_dtype="zipcache",
                            attn_type="decoder")
    cfg = SimpleNamespace(cache_config=SimpleNamespace(block_size=128, skip_page_size_padded=None))
    ours = Attention.get_kv_cache_spec(layer, cfg)
    assert isinstance(ours, ZipCacheSlidingSpec) and ours.sliding_window == 512
    full = cls.customize_spec(compat_full_spec(128))
    assert isinstance(full, ZipCacheSpec)
    assert (ours.page_size_bytes, ours.staging_blocks, ours.block_size) == (
        full.page_size_bytes, full.staging_blocks, 128)
    try:
        plain = Attention.get_kv_cache_spec.__wrapped__(layer, cfg)
    except Exception:  # noqa: BLE001 (vLLM moved: the patch's premise must be re-checked)
        plain = None
    assert type(plain) is SlidingWindowSpec, "vLLM now keeps customized sliding specs?"
    assert plain.page_size_bytes != ours.page_size_bytes


def compat_full_spec(block_size):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    return FullAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=256, dtype=torch.uint8)


def test_customize_spec_declares_exact_page_bytes(registered):
    from vllm.v1.kv_cache_interface import FullAttentionSpec, compute_layer_kv_cache_shape_bytes

    from zipcache_vllm.config import load_preset
    from zipcache_vllm.layout import BlockLayout
    from zipcache_vllm.vllm_plugin import backend

    for dtype, preset in (("zipcache", "zipcache"), ("zipcache_hc", "zipcache_hc")):
        spec = FullAttentionSpec(block_size=128, num_kv_heads=3, head_size=64, dtype=torch.uint8)
        out = backend.backend_for(dtype).customize_spec(spec)  # no current config: the class's dtype
        layout = BlockLayout.from_preset(load_preset(preset), 64, 3)
        assert out.page_size_bytes == layout.page_bytes
        assert compute_layer_kv_cache_shape_bytes(out, 10) == (10, 1, 1, layout.page_bytes)


def test_two_engines_in_one_process_keep_their_own_state(registered):
    """An engine's staging pool and step token ids hang off its own layers: its builders,
    its runner's hooks and its stats never reach another engine's in the same process."""
    from types import SimpleNamespace

    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from zipcache_vllm.vllm_plugin import backend

    def engine_config(num_layers: int):
        layers = {f"model.layers.{i}.self_attn.attn": SimpleNamespace(
            impl=backend.ZipCacheImpl(6, 64, 0.125, 2, None, None, "zipcache"))
            for i in range(num_layers)}
        return SimpleNamespace(compilation_config=SimpleNamespace(static_forward_context=layers),
                               scheduler_config=SimpleNamespace(max_num_seqs=2),
                               model_config=SimpleNamespace(dtype=torch.bfloat16, tokenizer=None))

    cfg_a, cfg_b = engine_config(2), engine_config(3)
    assert backend.engine_of(cfg_a) is None  # before its first metadata builder
    a = backend.engine_for(cfg_a, "cpu")
    b = backend.engine_for(cfg_b, "cpu")
    assert a is not b and a.pool is not b.pool
    assert backend.engine_for(cfg_a, "cpu") is a  # a second builder shares it
    assert backend.engine_of(cfg_a) is a and backend.staging_pool_of(cfg_b) is b.pool
    layers_b = cfg_b.compilation_config.static_forward_context.values()
    assert [(layer.impl.engine, layer.impl.layer_index) for layer in layers_b] == [
        (b, 0), (b, 1), (b, 2)]
    backend.record_step_tokens(cfg_a, torch.arange(4))
    assert a.step_token_ids.tolist() == [0, 1, 2, 3] and b.step_token_ids is None

    class State:
        block_ids = ([7],)

    for engine in (a, b):
        engine.pool.acquire(7)
    # The runner's lifecycle hook (patched by register) releases in its own engine's pool.
    GPUModelRunner._on_request_state_removed(SimpleNamespace(vllm_config=cfg_b), "r", State())
    assert (a.pool.in_use, b.pool.in_use) == (1, 0)
