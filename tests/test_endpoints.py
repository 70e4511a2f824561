"""The operator endpoints without an engine: routes, API key, 422s, stats arithmetic.
(``test_endpoints_live.py`` runs them on a real server.)"""
from __future__ import annotations

from argparse import Namespace
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from zipcache_vllm.planner.model_spec import load_model_spec  # noqa: E402
from zipcache_vllm.vllm_plugin.endpoints import ZipCacheEndpoints  # noqa: E402
from zipcache_vllm.vllm_plugin.kv_stats import summarize  # noqa: E402

KEY = "sk-test-zipcache"


class FakeEngine:
    """Just what the routes read from vLLM's EngineClient."""

    def __init__(self, model_dir, workers: list[dict] | Exception):
        import json

        cfg = json.loads((model_dir / "config.json").read_text())
        self.vllm_config = SimpleNamespace(cache_config=SimpleNamespace(cache_dtype="zipcache"))
        self.model_config = SimpleNamespace(hf_config=SimpleNamespace(to_dict=lambda: cfg),
                                            served_model_name="smollm2", dtype="torch.bfloat16")
        self.workers = workers

    async def collective_rpc(self, method: str):
        assert method == "zipcache_stats"
        if isinstance(self.workers, Exception):
            raise self.workers
        return self.workers


def _client(model_dir, workers, api_key=(KEY,)) -> TestClient:
    app = FastAPI()
    app.state.args = Namespace(api_key=list(api_key) if api_key else None)
    app.state.engine_client = FakeEngine(model_dir, workers)
    ZipCacheEndpoints().attach_router(app)
    return TestClient(app)


def _worker(**kw) -> dict:
    stats = summarize([([0, 1, 2], 300), ([0, 1, 3], 260)], 128, 30, 21360, 3, 64, 2, 2, 3_000_000)
    return stats | {"preset": "zipcache", "bytes_per_token": 30 * 21360 / 128, "page_compression": 4.6,
                    "capacity_tokens": 423_424, "staging_slots": 9, "staging_in_use": 2} | kw


def test_summarize_counts_shared_blocks_once():
    s = summarize([([0, 1, 2], 300), ([0, 1, 3], 260)], 128, 30, 1000, 3, 64, 2, 2, 500)
    # blocks 0 and 1 are shared (prefix caching): 128 + 128 + 44 + 4 tokens in 4 blocks
    assert (s["requests"], s["blocks_in_use"], s["tokens_stored"]) == (2, 4, 304)
    assert s["bytes_held"] == 4 * 30 * 1000 + 2 * 500
    assert s["bf16_bytes"] == 304 * 30 * 2 * 3 * 64 * 2
    assert s["measured_compression"] == pytest.approx(s["bf16_bytes"] / s["bytes_held"])
    empty = summarize([], 128, 30, 1000, 3, 64, 2)
    assert empty["tokens_stored"] == 0 and empty["measured_compression"] is None


def test_routes_need_the_api_key(model_dir):
    client = _client(model_dir, [_worker()])
    assert client.get("/zipcache/stats").status_code == 401
    assert client.get("/zipcache/stats", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/zipcache/plan", json={}).status_code == 401
    ok = client.get("/zipcache/stats", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200
    body = ok.json()
    assert body["preset"] == "zipcache" and body["staging_blocks_in_use"] == 2 and body["tokens_stored"] == 304
    assert body["measured_compression"] == pytest.approx(body["workers"][0]["bf16_bytes"]
                                                         / body["workers"][0]["bytes_held"])
    open_client = _client(model_dir, [_worker()], api_key=None)
    assert open_client.get("/zipcache/stats").status_code == 200


def test_stats_without_the_worker_extension_say_why(model_dir):
    client = _client(model_dir, AttributeError("no zipcache_stats"), api_key=None)
    body = client.get("/zipcache/stats").json()
    assert body["workers"] == [] and "worker-extension-cls" in body["error"]


@pytest.mark.parametrize("body,field", [
    ({"hardware": "cpu-dev", "max_model_len": -5}, "max_model_len"),
    ({"hardware": "TPU-v9", "max_model_len": 2048}, "hardware"),
    ({"hardware": "cpu-dev", "max_model_len": 2048, "kv_cache_dtypes": ["zipcache_nope"]}, "kv_cache_dtypes"),
    ({"hardware": "cpu-dev", "max_model_len": 2048, "model": "/etc"}, "model"),
    ({"hardware": "cpu-dev", "max_model_len": 2048, "gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
    ({"hardware": "cpu-dev", "max_model_len": 2048, "tensor_parallel_size": 2}, "tensor_parallel_size"),
    ({"hardware": "cpu-dev", "max_model_len": 2048, "surprise": 1}, "surprise"),
    ({"max_model_len": 2048}, "hardware"),
])
def test_bad_plan_requests_are_422_naming_the_field(model_dir, body, field):
    r = _client(model_dir, [], api_key=None).post("/zipcache/plan", json=body)
    assert r.status_code == 422, r.text
    assert any(err["loc"][-1] == field or field in err["loc"] for err in r.json()["detail"]), r.json()


def test_plan_of_the_served_model(model_dir):
    r = _client(model_dir, [], api_key=None).post("/zipcache/plan", json={
        "hardware": "cpu-dev", "kv_cache_space_gib": 2, "max_model_len": 2048,
        "kv_cache_dtypes": ["auto", "zipcache"]})
    assert r.status_code == 200, r.text
    rows = {row["cache_dtype"]: row for row in r.json()["rows"]}
    assert rows["auto"]["kv_tokens"] == 93_184 and rows["zipcache"]["kv_tokens"] == 423_424
    assert r.json()["model"]["num_layers"] == load_model_spec(model_dir).num_layers
    bundled = _client(model_dir, [], api_key=None).post("/zipcache/plan", json={
        "model": "llama3_8b", "hardware": "H100-80GB", "max_model_len": 8192})
    assert bundled.status_code == 200 and bundled.json()["estimates"]["weights_source"] == "estimate"


def test_metrics_gauges_follow_the_stats(model_dir):
    from prometheus_client import REGISTRY

    client = _client(model_dir, [_worker()], api_key=None)
    body = client.get("/zipcache/stats").json()
    assert REGISTRY.get_sample_value("zipcache_kv_tokens_stored") == body["tokens_stored"]
    assert REGISTRY.get_sample_value("zipcache_staging_slots_in_use") == 2
    assert REGISTRY.get_sample_value("zipcache_info", {"kv_cache_dtype": "zipcache", "preset": "zipcache"}) == 1


def test_vllm_endpoint_plugin_contract():
    """What endpoints.py relies on in vLLM 0.32 (public plugin surface, no patch): the entry point
    group and its VLLM_PLUGINS gate, the EndpointPlugin protocol, vLLM's API-key middleware not
    covering /zipcache (hence our own check), its validation handler answering 400 (hence our own
    422), the default Prometheus registry behind /metrics, and the worker-extension config field."""
    import importlib.metadata as md
    import inspect

    pytest.importorskip("vllm")
    from prometheus_client import REGISTRY
    from vllm.config.parallel import ParallelConfig
    from vllm.entrypoints.serve.exception_handling.handlers import validation
    from vllm.entrypoints.serve.middleware.authenticate import GUARDED_PREFIX
    from vllm.plugins import ENDPOINT_PLUGINS_GROUP, load_endpoint_plugins
    from vllm.plugins.endpoint_plugins.interface import EndpointPlugin
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    assert ENDPOINT_PLUGINS_GROUP == "vllm.endpoint_plugins"
    eps = {ep.name: ep.value for ep in md.entry_points(group=ENDPOINT_PLUGINS_GROUP)}
    assert eps.get("zipcache") == "zipcache_vllm.vllm_plugin.endpoints:ZipCacheEndpoints"
    assert "VLLM_PLUGINS" in inspect.getsource(load_endpoint_plugins)
    assert isinstance(ZipCacheEndpoints(), EndpointPlugin)
    assert not any("/zipcache".startswith(p) for p in GUARDED_PREFIX)
    assert "BAD_REQUEST" in inspect.getsource(validation.validation_exception_handler)
    if "PROMETHEUS_MULTIPROC_DIR" not in __import__("os").environ:
        assert get_prometheus_registry() is REGISTRY
    assert "worker_extension_cls" in ParallelConfig.__dataclass_fields__
