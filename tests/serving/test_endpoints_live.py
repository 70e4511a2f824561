"""``/zipcache/stats``, ``/zipcache/plan`` and the ``zipcache_*`` metrics on a live
``vllm serve --kv-cache-dtype zipcache --api-key ...`` with the ``VLLM_PLUGINS`` that
``zipcache-vllm serve`` sets (ours and vLLM's default plugins).

One server for the module. It is started without ``--worker-extension-cls``: the plugin
installs the stats extension by default for zipcache dtypes.
"""
from __future__ import annotations

import threading
import time

import pytest

from _server import Server
from zipcache_vllm.cli import vllm_plugins
from zipcache_vllm.planner.plan import PlanRequest, make_plan

requests = pytest.importorskip("requests")
pytestmark = [pytest.mark.slow, pytest.mark.engine]

KV_SPACE_GIB = 2
MAX_MODEL_LEN = 2048
KEY = "sk-zipcache-live-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "Write a long, detailed story about a lighthouse keeper and a storm. " * 70  # ~1000 tokens
STORED = 1024  # tokens in the cache when the running request is inspected


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir, "--kv-cache-dtype", "zipcache", "--api-key", KEY, max_model_len=MAX_MODEL_LEN,
               kv_space_gib=KV_SPACE_GIB, env={"VLLM_PLUGINS": vllm_plugins(None), "ZIPCACHE_METRICS_INTERVAL_S": "1"})
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def _get(server, path, **kw):
    return requests.get(f"{server.url}{path}", timeout=60, **kw)


def _stats(server) -> dict:
    r = _get(server, "/zipcache/stats", headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def test_routes_honor_the_api_key(server):
    assert _get(server, "/zipcache/stats").status_code == 401
    assert _get(server, "/zipcache/stats", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert requests.post(f"{server.url}/zipcache/plan", json={}, timeout=60).status_code == 401
    assert _get(server, "/v1/models").status_code == 401  # vLLM's own guard, same key
    assert _get(server, "/zipcache/stats", headers=AUTH).status_code == 200


def test_idle_stats_match_the_engine_and_the_planner(server, model_dir):
    stats = _stats(server)
    plan = make_plan(PlanRequest(model=str(model_dir), hardware="cpu-dev", kv_cache_space_gib=KV_SPACE_GIB,
                                 max_model_len=MAX_MODEL_LEN, kv_cache_dtypes=["zipcache"]))
    row = plan.row("zipcache")
    assert stats["kv_cache_dtype"] == "zipcache" and stats["preset"] == "zipcache"
    # capacity_tokens: the tokens the pages hold; the log: requests of --max-model-len with
    # their staging blocks (docs/BACKEND.md#staging)
    assert stats["capacity_tokens"] == row.num_blocks * 128 and server.kv_tokens() == row.kv_tokens
    assert stats["bytes_per_token"] == pytest.approx(row.bytes_per_token)
    assert stats["page_compression"] == pytest.approx(4.602, abs=0.001)
    # vLLM's default --max-num-seqs (128 for the CPU API server), + 1 spare bookkeeping slot
    assert stats["staging_slots"] == 129 and stats["staging_blocks_in_use"] == 0
    assert stats["requests"] == 0 and stats["tokens_stored"] == 0 and stats["error"] is None


def _model(server) -> str:
    return _get(server, "/v1/models", headers=AUTH).json()["data"][0]["id"]


def _metrics(server) -> dict:
    """``{name: {engine label: value}}`` of the zipcache_* series, checking vLLM's labels."""
    from prometheus_client.parser import text_string_to_metric_families

    model, out = _model(server), {}
    for family in text_string_to_metric_families(_get(server, "/metrics").text):
        if family.name.startswith("zipcache_"):
            for sample in family.samples:
                assert sample.labels["model_name"] == model, sample
                out.setdefault(sample.name, {})[sample.labels["engine"]] = sample.value
    return out


def test_stats_while_a_request_runs(server):
    body = {"model": _model(server), "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 300,
            "ignore_eos": True, "temperature": 0}
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=requests.post(
        f"{server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=600)))
    thread.start()
    seen = busy_metrics = None
    deadline = time.time() + 300
    while thread.is_alive() and time.time() < deadline:
        stats = _stats(server)
        if seen is None and stats["tokens_stored"] > STORED:
            seen = stats
        found = _metrics(server)
        if found.get("zipcache_kv_tokens_stored", {}).get("0", 0) > STORED:
            busy_metrics = found
        if seen is not None and busy_metrics is not None:
            break
        time.sleep(0.3)
    thread.join(600)
    assert result["r"].status_code == 200
    assert seen is not None, "never saw the running request in /zipcache/stats"
    w = seen["workers"][0]
    assert seen["requests"] == 1 and seen["staging_blocks_in_use"] <= 1
    # paged staging: the request's blocks include the ones it holds ahead for its partial block
    from zipcache_vllm.planner.capacity import page_format

    ahead = page_format("zipcache", 64, 3, 2, "cpu").staging_blocks
    assert ahead == 4  # 8-bit staging of two blocks (the default's saliency_delay)
    assert seen["tokens_stored"] <= (seen["blocks_in_use"] - ahead) * 128
    assert w["bytes_held"] == seen["blocks_in_use"] * 30 * w["page_bytes"]
    assert w["bf16_bytes"] == seen["tokens_stored"] * 30 * 2 * 3 * 64 * 2
    assert seen["measured_compression"] == pytest.approx(w["bf16_bytes"] / w["bytes_held"])
    # staging (4 blocks ahead) is a fixed cost per request: at ~1k tokens the ratio is below the page's
    assert 2.0 < seen["measured_compression"] < seen["page_compression"]
    print(f"\nmeasured compression with {seen['tokens_stored']} tokens stored: {seen['measured_compression']:.3f}")
    deadline = time.time() + 60
    while _stats(server)["requests"] and time.time() < deadline:
        time.sleep(0.5)
    assert _stats(server)["staging_blocks_in_use"] == 0
    # the gauges saw it too: blocks from vLLM's scheduler stats, the rest from the workers
    assert busy_metrics is not None, "the worker gauges never showed the running request"
    assert busy_metrics["zipcache_kv_blocks_in_use"]["0"] > 0
    assert busy_metrics["zipcache_staging_slots_in_use"]["0"] <= 1
    assert 2.0 < busy_metrics["zipcache_kv_measured_compression_ratio"]["0"] < seen["page_compression"]
    # idle again: nothing stored, no measured ratio (set without asking the workers)
    deadline = time.time() + 30
    while _metrics(server).get("zipcache_kv_tokens_stored", {}).get("0") and time.time() < deadline:
        time.sleep(0.5)
    idle = _metrics(server)
    assert idle["zipcache_kv_tokens_stored"]["0"] == 0 and idle["zipcache_kv_blocks_in_use"]["0"] == 0
    assert "zipcache_kv_measured_compression_ratio" not in idle


def test_metrics_on_vllms_metrics_endpoint(server):
    """The stat logger's gauges (no RPC) agree with what the workers report over the RPC."""
    from prometheus_client.parser import text_string_to_metric_families

    stats = _stats(server)
    found = _metrics(server)
    assert found["zipcache_kv_capacity_tokens"]["0"] == stats["capacity_tokens"]
    assert found["zipcache_kv_bytes_per_token"]["0"] == pytest.approx(stats["bytes_per_token"])
    assert found["zipcache_kv_page_compression_ratio"]["0"] == pytest.approx(stats["page_compression"])
    assert found["zipcache_staging_slots"]["0"] == stats["staging_slots"] == 129
    families = {f.name: f for f in text_string_to_metric_families(_get(server, "/metrics").text)}
    info = families["zipcache_info"].samples[0]
    assert info.labels == {"model_name": _model(server), "engine": "0", "kv_cache_dtype": "zipcache",
                           "preset": "zipcache"} and info.value == 1
    assert any(name.startswith("vllm:") for name in families)  # vLLM's own metrics, same endpoint


def test_plan_over_http_equals_the_engine(server):
    r = requests.post(f"{server.url}/zipcache/plan", headers=AUTH, timeout=60, json={
        "hardware": "cpu-dev", "kv_cache_space_gib": KV_SPACE_GIB, "max_model_len": MAX_MODEL_LEN,
        "kv_cache_dtypes": ["auto", "zipcache"]})
    assert r.status_code == 200, r.text
    rows = {row["cache_dtype"]: row for row in r.json()["rows"]}
    assert rows["zipcache"]["kv_tokens"] == server.kv_tokens()
    assert r.json()["request"]["model"] == "served" and r.json()["model"]["num_kv_heads"] == 3


@pytest.mark.parametrize("body,field", [
    ({"hardware": "cpu-dev", "max_model_len": "long"}, "max_model_len"),
    ({"hardware": "cpu-dev", "max_model_len": 2048, "tensor_parallel_size": 2}, "tensor_parallel_size"),
    ({"hardware": "H100-80GB", "max_model_len": 2048, "concurrency": 0}, "concurrency"),
])
def test_bad_plan_input_is_422_naming_the_field(server, body, field):
    r = requests.post(f"{server.url}/zipcache/plan", headers=AUTH, json=body, timeout=60)
    assert r.status_code == 422, r.text
    assert any(field in err["loc"] for err in r.json()["detail"]), r.json()
