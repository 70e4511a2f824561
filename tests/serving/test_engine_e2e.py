"""End to end: ``vllm serve MODEL --kv-cache-dtype zipcache`` over real HTTP.

One zipcache server is shared by the module (the machine runs one engine at a
time). The engine's own log line "KV cache size: N tokens" is the capacity measure;
every other preset's capacity and quality through the engine are checked by the
session's quick engine eval (test_engine_eval.py, test_planner_engine.py).
``model_dir`` (conftest) is the prepared SmolLM2-135M-Instruct folder.
"""
from __future__ import annotations

import json
import re
import time

import pytest
from _server import Server, logged_kv_tokens

requests = pytest.importorskip("requests")

pytestmark = [pytest.mark.slow, pytest.mark.engine]

KV_SPACE_GIB = 1  # VLLM_CPU_KVCACHE_SPACE for every engine of this module
MODEL_MAX_LEN = 8192  # SmolLM2-135M's max_position_embeddings: vLLM's default --max-model-len
PREFILL_CHUNK = 320  # --max-num-batched-tokens of the shared server: not a multiple of 128
MIN_PAGE_RATIO = 4.5  # default preset's pages vs bf16's in the same budget
# default preset's logged KV tokens vs auto's, staging included: issue 20's bar was 4.4 with one
# staged block a request; the default's delayed block (saliency_delay, issue 21) costs two more
# staging blocks (4.33x), and zipcache_nodelay keeps 4.46x (the planner's, asserted below)
MIN_LOGGED_RATIO = 4.3
MIN_LOGGED_RATIO_NODELAY = 4.4
STARTUP_S = 900  # generous: the 2-core machine is often shared with other jobs


@pytest.fixture(scope="module")
def auto_kv_tokens(model_dir) -> int:
    """``auto``'s logged "KV cache size" with the shared server's settings (the engine stops
    once it logged it)."""
    return logged_kv_tokens(model_dir, "auto", KV_SPACE_GIB)


@pytest.fixture(scope="module")
def zipcache_server(model_dir):
    # vLLM's defaults but for the budget: --max-model-len (the model's) and --max-num-seqs.
    # Small prefill chunks so that long prompts are chunked (staging across chunks).
    server = Server(model_dir, "--kv-cache-dtype", "zipcache", "--max-num-batched-tokens",
                    str(PREFILL_CHUNK), "--worker-extension-cls",
                    "zipcache_vllm.vllm_plugin.worker_ext.ZipCacheWorkerExtension",
                    max_model_len=None, kv_space_gib=KV_SPACE_GIB)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _coherent(text: str) -> bool:
    words = re.findall(r"[A-Za-z]{2,}", text)
    return len(words) >= 3 and sum(len(w) for w in words) > 0.5 * len(text.replace(" ", ""))


# -- startup errors and capacity (these run before the shared server starts) ----------

def test_unknown_preset_fails_at_startup_listing_valid_ones(model_dir):
    server = Server(model_dir, "--kv-cache-dtype", "zipcache_nope")
    try:
        server.proc.wait(STARTUP_S)
    finally:
        server.stop()
    log = server.log()
    assert server.proc.returncode != 0
    assert "zipcache_nope" in log and "invalid choice" in log
    assert "zipcache_hc" in log and "zipcache_kivi2" in log


def test_block_size_must_match_preset(model_dir):
    server = Server(model_dir, "--kv-cache-dtype", "zipcache", "--block-size", "64")
    try:
        server.proc.wait(STARTUP_S)
    finally:
        server.stop()
    assert server.proc.returncode != 0
    assert "stores blocks of 128 tokens" in server.log()


def test_capacity_vs_auto(auto_kv_tokens, zipcache_server, model_dir):
    """At ``VLLM_CPU_KVCACHE_SPACE=1`` with vLLM's default --max-model-len and --max-num-seqs,
    the engine's logged "KV cache size" (requests of --max-model-len, each with its 4 staging
    blocks) is >= 4.3x ``auto``'s, both read from the engines' logs, and the planner's; the
    pages hold >= 4.5x the tokens of ``auto``'s blocks. Without the delay (2 staging blocks)
    the planner, which equals vLLM's count, gives >= 4.4x."""
    from zipcache_vllm.planner.plan import PlanRequest, make_plan

    zc_tokens = zipcache_server.kv_tokens()
    assert json.loads((model_dir / "config.json").read_text())["max_position_embeddings"] == MODEL_MAX_LEN
    plan = make_plan(PlanRequest(model=str(model_dir), hardware="cpu-dev", kv_cache_space_gib=KV_SPACE_GIB,
                                 max_model_len=MODEL_MAX_LEN,
                                 kv_cache_dtypes=["auto", "zipcache", "zipcache_nodelay"]))
    rows = {r.cache_dtype: r for r in plan.rows}
    stats = zipcache_server.rpc("zipcache_stats")[0]  # the worker's: pages x block size
    page_ratio = stats["capacity_tokens"] / (rows["auto"].num_blocks * 128)
    print(f"\nKV cache at VLLM_CPU_KVCACHE_SPACE={KV_SPACE_GIB}: auto {auto_kv_tokens} tokens logged, "
          f"zipcache {zc_tokens} logged = {zc_tokens / auto_kv_tokens:.3f}x, pages "
          f"{stats['capacity_tokens']} tokens = {page_ratio:.3f}x auto's (staging "
          f"{zipcache_server.staging_stats()})")
    assert zc_tokens / auto_kv_tokens >= MIN_LOGGED_RATIO
    assert auto_kv_tokens == rows["auto"].kv_tokens and zc_tokens == rows["zipcache"].kv_tokens
    assert stats["capacity_tokens"] == rows["zipcache"].num_blocks * 128
    assert page_ratio >= MIN_PAGE_RATIO
    assert rows["zipcache_nodelay"].kv_tokens / auto_kv_tokens >= MIN_LOGGED_RATIO_NODELAY


# -- serving -------------------------------------------------------------------------

def test_chat_non_stream(zipcache_server):
    r = zipcache_server.chat("What is the capital of France? Answer in one sentence.",
                             max_tokens=40)
    assert r["status"] == 200
    text = r["json"]["choices"][0]["message"]["content"]
    print("\nanswer:", text)
    assert "Paris" in text


def test_chat_stream(zipcache_server):
    body = {"model": zipcache_server.model_name(), "stream": True, "max_tokens": 60,
            "temperature": 0,
            "messages": [{"role": "user", "content": "Name three colors of the rainbow."}]}
    pieces = []
    with requests.post(f"{zipcache_server.url}/v1/chat/completions", json=body, stream=True,
                       timeout=600) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"]
            pieces.append(delta.get("content") or "")
    text = "".join(pieces)
    print("\nstreamed:", text)
    assert _coherent(text)


def test_long_prompt_packs_blocks_and_hits_prefix_cache(zipcache_server):
    """A prompt of several blocks, prefilled in chunks of PREFILL_CHUNK tokens, is packed;
    the same prompt again reuses its pages (prefix-cache hit on a block boundary)."""
    facts = " ".join(f"Fact {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}."
                     for i in range(60))
    prompt = facts + " Summarize these facts in two sentences."
    first = zipcache_server.chat(prompt, max_tokens=150)
    second = zipcache_server.chat(prompt, max_tokens=150)
    for r in (first, second):
        assert r["status"] == 200
        assert r["json"]["usage"]["prompt_tokens"] > 3 * 128
        assert _coherent(r["json"]["choices"][0]["message"]["content"])
    metrics = requests.get(f"{zipcache_server.url}/metrics", timeout=30).text
    hits = [float(line.split()[-1]) for line in metrics.splitlines()
            if line.startswith("vllm:prefix_cache_hits_total")]
    assert hits and hits[0] >= 3 * 128


def test_prompt_longer_than_max_model_len_is_400(zipcache_server):
    r = zipcache_server.chat("hello " * (MODEL_MAX_LEN + 100), max_tokens=8)
    assert r["status"] == 400
    assert "maximum context length" in json.dumps(r["json"]).lower() or \
        "max_model_len" in json.dumps(r["json"]).lower()


def test_staging_slots_released_after_requests_and_aborted_streams(zipcache_server):
    s = zipcache_server
    body = {"model": s.model_name(), "stream": True, "max_tokens": 400, "temperature": 0,
            "messages": [{"role": "user", "content": "Tell me a very long story about a cat."}]}
    # Abort two streams mid-generation (client disconnects).
    for _ in range(2):
        with requests.post(f"{s.url}/v1/chat/completions", json=body, stream=True,
                           timeout=600) as r:
            for i, _line in enumerate(r.iter_lines()):
                if i >= 5:
                    break
    # Concurrent requests: several rows per step, each with its own staging slot.
    from concurrent.futures import ThreadPoolExecutor
    prompts = [f"Write {n} sentences about the sea." for n in (2, 3, 4, 5)]
    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda p: s.chat(p, max_tokens=150), prompts))
    for r in results:
        assert r["status"] == 200 and _coherent(r["json"]["choices"][0]["message"]["content"])
    assert s.chat("Say hi.", max_tokens=5)["status"] == 200
    deadline = time.time() + 60
    stats = s.staging_stats()
    while stats["in_use"] and time.time() < deadline:
        time.sleep(1)
        stats = s.staging_stats()
    print("\nstaging after requests:", stats)
    assert stats["slots"] > 0 and stats["in_use"] == 0
