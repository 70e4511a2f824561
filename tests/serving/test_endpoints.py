"""The operator endpoints and metrics without an engine: routes, API key, 422s, stats
arithmetic, the stat logger and the worker-gauge refresh. (``test_endpoints_live.py`` runs
them on a real server.)"""
from __future__ import annotations

import asyncio
from argparse import Namespace
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from zipcache_vllm.planner.model_spec import load_model_spec  # noqa: E402
from zipcache_vllm.vllm_plugin import metrics  # noqa: E402
from zipcache_vllm.vllm_plugin.endpoints import ZipCacheEndpoints, refresh_worker_gauges  # noqa: E402
from zipcache_vllm.vllm_plugin.kv_stats import by_engine, combine, summarize  # noqa: E402

KEY = "sk-test-zipcache"


class FakeEngine:
    """Just what the routes read from vLLM's EngineClient."""

    def __init__(self, model_dir, workers: list[dict] | Exception, served_model_name: str = "smollm2"):
        import json

        cfg = json.loads((model_dir / "config.json").read_text())
        self.vllm_config = SimpleNamespace(cache_config=SimpleNamespace(cache_dtype="zipcache"))
        self.model_config = SimpleNamespace(hf_config=SimpleNamespace(to_dict=lambda: cfg),
                                            served_model_name=served_model_name, dtype="torch.bfloat16")
        self.workers = workers
        self.calls = 0

    async def collective_rpc(self, method: str):
        assert method == "zipcache_stats"
        self.calls += 1
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
    assert rows["auto"]["kv_tokens"] == 93_184 and rows["zipcache"]["kv_tokens"] == 343_142
    assert r.json()["model"]["num_layers"] == load_model_spec(model_dir).num_layers
    bundled = _client(model_dir, [], api_key=None).post("/zipcache/plan", json={
        "model": "llama3_8b", "hardware": "H100-80GB", "max_model_len": 8192})
    assert bundled.status_code == 200 and bundled.json()["estimates"]["weights_source"] == "estimate"


def _sample(name: str, model_name: str, engine: str = "0", **labels):
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, {"model_name": model_name, "engine": engine, **labels})


def test_worker_gauges_follow_the_stats(model_dir):
    client = _client(model_dir, [_worker()], api_key=None)
    body = client.get("/zipcache/stats").json()
    assert _sample("zipcache_kv_tokens_stored", "smollm2") == body["tokens_stored"]
    assert _sample("zipcache_staging_slots_in_use", "smollm2") == 2
    assert _sample("zipcache_kv_measured_compression_ratio", "smollm2") == pytest.approx(
        body["measured_compression"])


def test_combine_per_engine():
    """Tensor-parallel ranks of one engine share the counts and add their bytes; engines
    (data-parallel ranks) are kept apart, as vLLM's ``engine`` label does."""
    a, b = _worker(rank=0, engine=0), _worker(rank=1, engine=0)
    other = _worker(rank=0, engine=1, tokens_stored=7)
    groups = by_engine([a, b, other])
    assert sorted(groups) == [0, 1] and len(groups[0]) == 2
    one = combine(groups[0])
    assert one["tokens_stored"] == a["tokens_stored"]
    assert one["bytes_per_token"] == 2 * a["bytes_per_token"]
    assert one["measured_compression"] == pytest.approx(a["measured_compression"])
    assert combine(groups[1])["tokens_stored"] == 7
    assert combine([])["measured_compression"] is None


def _vllm_config(model_dir, cache_dtype="zipcache", name="stat-logger-test", tp=1):
    """What ZipCacheStatLogger reads of vLLM's VllmConfig (the contract test checks the names)."""
    import torch

    spec = load_model_spec(model_dir)
    heads = lambda parallel: max(1, spec.num_kv_heads // parallel.tensor_parallel_size)  # noqa: E731
    model = SimpleNamespace(served_model_name=name, dtype=torch.bfloat16, get_num_kv_heads=heads,
                            get_head_size=lambda: spec.head_size,
                            get_total_num_hidden_layers=lambda: spec.num_layers)
    return SimpleNamespace(model_config=model, parallel_config=SimpleNamespace(tensor_parallel_size=tp),
                           cache_config=SimpleNamespace(cache_dtype=cache_dtype, block_size=128, num_gpu_blocks=None),
                           scheduler_config=SimpleNamespace(max_num_seqs=8))


def test_stat_logger_sets_the_engine_gauges_without_rpc(model_dir, monkeypatch):
    from vllm.v1.metrics.stats import SchedulerStats

    from zipcache_vllm.config import load_preset
    from zipcache_vllm.layout import BlockLayout

    monkeypatch.setattr(metrics, "_running", {})
    cfg = _vllm_config(model_dir)
    logger = metrics.ZipCacheStatLogger(cfg, engine_index=0)
    cfg.cache_config.num_gpu_blocks = 3309  # filled in by vLLM once the engine is up
    logger.log_engine_initialized()
    logger.record(SchedulerStats(num_running_reqs=2, kv_cache_usage=0.25), None)
    assert logger.active
    layout = BlockLayout.from_preset(load_preset("zipcache"), 64, 3)
    name = "stat-logger-test"
    assert _sample("zipcache_info", name, kv_cache_dtype="zipcache", preset="zipcache") == 1
    assert _sample("zipcache_kv_capacity_tokens", name) == 3309 * 128
    assert _sample("zipcache_kv_blocks_in_use", name) == round(0.25 * 3308)  # one null block
    assert _sample("zipcache_kv_bytes_per_token", name) == pytest.approx(30 * layout.page_bytes / 128)
    bf16_page = 2 * 3 * 64 * 2 * 128  # K and V, 3 heads of 64, 2 bytes, 128 tokens
    assert _sample("zipcache_kv_page_compression_ratio", name) == pytest.approx(bf16_page / layout.page_bytes)
    assert _sample("zipcache_staging_slots", name) == 9
    assert metrics.engines_idle() is False
    # the same figures the workers report through the RPC (kv_stats.worker_stats)
    worker = _worker()
    assert _sample("zipcache_kv_bytes_per_token", name) == pytest.approx(worker["bytes_per_token"])


def test_stat_logger_for_vllm_dtypes_and_tensor_parallel(model_dir, monkeypatch):
    monkeypatch.setattr(metrics, "_running", {})
    cfg = _vllm_config(model_dir, cache_dtype="auto", name="stat-logger-auto")
    metrics.ZipCacheStatLogger(cfg, engine_index=1).log_engine_initialized()
    assert _sample("zipcache_info", "stat-logger-auto", "1", kv_cache_dtype="auto", preset="none") == 1
    assert _sample("zipcache_kv_bytes_per_token", "stat-logger-auto", "1") is None  # zipcache pages only
    tp = metrics.layout_figures(_vllm_config(model_dir, tp=3))
    one = metrics.layout_figures(_vllm_config(model_dir))
    assert tp["bytes_per_token"] == pytest.approx(one["bytes_per_token"])  # 3 heads over 3 ranks: same bytes
    assert tp["page_compression_ratio"] == pytest.approx(one["page_compression_ratio"])


def test_stat_logger_failure_turns_it_off_not_the_server(model_dir, caplog):
    cfg = _vllm_config(model_dir, cache_dtype="zipcache_nope", name="stat-logger-broken")
    logger = metrics.ZipCacheStatLogger(cfg)
    logger.log_engine_initialized()
    logger.record(SimpleNamespace(num_running_reqs=1, kv_cache_usage=0.5), None)
    assert not logger.active
    assert "zipcache metrics turned off" in caplog.text
    assert _sample("zipcache_kv_capacity_tokens", "stat-logger-broken") is None


def test_metric_names_and_labels_follow_vllm(model_dir, monkeypatch):
    """Every zipcache_* series has vLLM's model_name and engine labels; ratios end in _ratio."""
    from prometheus_client import REGISTRY

    monkeypatch.setattr(metrics, "_running", {})
    metrics.ZipCacheStatLogger(_vllm_config(model_dir, name="stat-logger-names")).log_engine_initialized()
    metrics.set_worker_gauges([_worker()], "stat-logger-names")
    names = set(metrics.ENGINE_GAUGES) | set(metrics.WORKER_GAUGES) | {metrics.INFO}
    assert all(n.endswith("_ratio") for n in names if "compression" in n)
    seen = set()
    for family in REGISTRY.collect():
        if family.name.startswith("zipcache_"):
            for sample in family.samples:
                assert {"model_name", "engine"} <= set(sample.labels), sample
                seen.add(family.name)
    assert seen == names


def _refresh_for(engine, seconds: float = 0.3) -> bool:
    """Run the refresh loop for a while; True when it stopped by itself."""
    async def run():
        task = asyncio.create_task(refresh_worker_gauges(engine, 0.01))
        await asyncio.sleep(seconds)
        stopped = task.done()
        task.cancel()
        return stopped
    return asyncio.run(run())


def test_refresh_asks_the_workers_only_while_requests_run(model_dir, monkeypatch):
    from vllm.v1.metrics.stats import SchedulerStats

    monkeypatch.setattr(metrics, "_running", {})
    assert metrics.engines_idle() is None  # no stat logger: ask the workers
    logger = metrics.ZipCacheStatLogger(_vllm_config(model_dir, name="refresh"))
    assert metrics.engines_idle() is True  # a new engine, before any step
    engine = FakeEngine(model_dir, [_worker()], served_model_name="refresh")
    assert not _refresh_for(engine)
    assert engine.calls == 0
    logger.record(SchedulerStats(num_running_reqs=0), None)
    assert not _refresh_for(engine)
    assert engine.calls == 0  # idle: no RPC, and nothing stored
    assert _sample("zipcache_kv_tokens_stored", "refresh") == 0
    assert _sample("zipcache_kv_measured_compression_ratio", "refresh") is None
    logger.record(SchedulerStats(num_running_reqs=2), None)
    assert not _refresh_for(engine)
    assert engine.calls > 0
    assert _sample("zipcache_kv_tokens_stored", "refresh") == _worker()["tokens_stored"]
    assert _sample("zipcache_kv_measured_compression_ratio", "refresh") == pytest.approx(
        _worker()["measured_compression"])


def test_refresh_stops_when_the_workers_cannot_answer(model_dir, monkeypatch):
    monkeypatch.setattr(metrics, "_running", {})
    engine = FakeEngine(model_dir, AttributeError("no zipcache_stats"))
    assert _refresh_for(engine)
    assert engine.calls == 1


def test_vllm_plugin_contract():
    """What endpoints.py and metrics.py rely on in vLLM 0.32 (public plugin surface, no patch): the
    entry point groups and the VLLM_PLUGINS gate, the EndpointPlugin protocol, vLLM's API-key
    middleware not covering /zipcache (hence our own check), its validation handler answering 400
    (hence our own 422), the default Prometheus registry behind /metrics, the worker-extension
    config field, and the stat-logger interface with what it receives and reads."""
    import importlib.metadata as md
    import inspect
    import os

    pytest.importorskip("vllm")
    from prometheus_client import REGISTRY
    from vllm.config.model import ModelConfig
    from vllm.config.parallel import ParallelConfig
    from vllm.entrypoints.serve.exception_handling.handlers import validation
    from vllm.entrypoints.serve.middleware.authenticate import GUARDED_PREFIX
    from vllm.plugins import ENDPOINT_PLUGINS_GROUP, STAT_LOGGER_PLUGINS_GROUP, load_endpoint_plugins
    from vllm.plugins.endpoint_plugins.interface import EndpointPlugin
    from vllm.v1.metrics.loggers import StatLoggerBase, load_stat_logger_plugin_factories
    from vllm.v1.metrics.prometheus import get_prometheus_registry
    from vllm.v1.metrics.stats import SchedulerStats

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
    assert "data_parallel_rank" in ParallelConfig.__dataclass_fields__  # kv_stats: the engine label
    # The stat logger: its entry point group, vLLM's type check, what record() receives and
    # what layout_figures reads of the config.
    assert STAT_LOGGER_PLUGINS_GROUP == "vllm.stat_logger_plugins"
    eps = {ep.name: ep.value for ep in md.entry_points(group=STAT_LOGGER_PLUGINS_GROUP)}
    assert eps.get("zipcache") == "zipcache_vllm.vllm_plugin.metrics:ZipCacheStatLogger"
    assert issubclass(metrics.ZipCacheStatLogger, StatLoggerBase)
    if os.environ.get("VLLM_PLUGINS") in (None, "zipcache"):
        assert metrics.ZipCacheStatLogger in load_stat_logger_plugin_factories()
    assert list(inspect.signature(StatLoggerBase.record).parameters) == [
        "self", "scheduler_stats", "iteration_stats", "mm_cache_stats", "engine_idx"]
    assert {"num_running_reqs", "kv_cache_usage"} <= set(SchedulerStats.__dataclass_fields__)
    for method in ("get_num_kv_heads", "get_head_size", "get_total_num_hidden_layers"):
        assert callable(getattr(ModelConfig, method)), method
