"""Gemma 3 270M served with ``--kv-cache-dtype zipcache``: a hybrid model (sliding window of
512 tokens on 15 of its 18 layers, full attention on the other 3), one KV head of size 256.

Every layer stores zipcache pages: the sliding-window layers too, in KV-cache groups of
their own with the same page size (``vllm_plugin/kv_spec.py``), so vLLM's hybrid
allocator pads nothing and its sliding-window manager frees the blocks that leave the
window. Exactness of the windowed reads is checked layer by layer in
test_engine_fidelity.py (``recorded_gemma3``); here the served engine's capacity, read
from its own log against ``auto``'s and the planner's, and completions over HTTP of
prompts longer than the window.
"""
from __future__ import annotations

import pytest
from _server import WORKER_EXT, Server, leaked, logged_kv_tokens

pytestmark = [pytest.mark.slow, pytest.mark.engine]

KV_SPACE_GIB = 1  # VLLM_CPU_KVCACHE_SPACE of every engine
MIN_LOGGED_RATIO = {"zipcache": 4.4, "zipcache_hc": 5.5}  # logged KV tokens vs auto's, staging included


@pytest.fixture(scope="module")
def auto_kv_tokens(gemma_dir) -> int:
    return logged_kv_tokens(gemma_dir, "auto", KV_SPACE_GIB)


@pytest.fixture(scope="module")
def zipcache_server(gemma_dir):
    server = Server(gemma_dir, "--kv-cache-dtype", "zipcache", "--worker-extension-cls", WORKER_EXT,
                    max_model_len=None, kv_space_gib=KV_SPACE_GIB)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_capacity_vs_auto_and_the_planner(auto_kv_tokens, zipcache_server, gemma_dir):
    """The engine's logged "KV cache size" (requests of 32,768 tokens: full-attention
    groups hold all of them, sliding-window groups a window plus a step's tokens, each
    with its staging blocks) for the default and the high-compression preset vs ``auto``'s,
    all three equal to the planner's. (Every other preset: the planner equals vLLM's own
    computation, test_planner.py; docs/RESULTS.md lists each one's engine capacity.)"""
    from zipcache_vllm.planner.plan import PlanRequest, make_plan

    logged = {"auto": auto_kv_tokens, "zipcache": zipcache_server.kv_tokens(),
              "zipcache_hc": logged_kv_tokens(gemma_dir, "zipcache_hc", KV_SPACE_GIB)}
    plan = make_plan(PlanRequest(model=str(gemma_dir), hardware="cpu-dev", kv_cache_space_gib=KV_SPACE_GIB,
                                 max_model_len=32768, kv_cache_dtypes=list(logged)))
    for dtype, tokens in logged.items():
        print(f"\nGemma 3 270M at VLLM_CPU_KVCACHE_SPACE={KV_SPACE_GIB}, --max-model-len 32768, {dtype}: "
              f"{tokens} tokens logged = {tokens / auto_kv_tokens:.3f}x auto")
        assert tokens == plan.row(dtype).kv_tokens, dtype
        assert tokens / auto_kv_tokens >= MIN_LOGGED_RATIO.get(dtype, 1.0), dtype
    assert "kv cache group sizes (128, 128, 128, 128, 128, 128)" in zipcache_server.log()


def test_completions_past_the_window(zipcache_server, gemma_dir):
    """Prompts of real text longer than the window (chunked by vLLM's 2,048-token budget
    and batched): the greedy continuation is text, and no staging slot outlives its
    request."""
    from transformers import AutoTokenizer

    from zipcache_vllm.eval.offline import token_windows_for

    tok = AutoTokenizer.from_pretrained(gemma_dir)
    prompts = [w[:n] for w, n in zip(token_windows_for(tok, 2600, 2), (2600, 1300))]
    for p in prompts:
        r = zipcache_server.complete(p, max_tokens=24)
        assert r["status"] == 200, r
        assert r["json"]["usage"]["prompt_tokens"] == len(p)
        text = r["json"]["choices"][0]["text"]
        print(f"\n{len(p)} tokens -> {text!r}")
        assert sum(c.isalpha() for c in text) > len(text) / 2
    assert not any(leaked(s) for s in zipcache_server.wait_idle())
