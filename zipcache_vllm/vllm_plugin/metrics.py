"""Prometheus gauges of the zipcache KV cache on vLLM's own ``/metrics``, in vLLM's conventions.

Every series carries vLLM's ``model_name`` (the served model name) and ``engine`` (the
engine index) labels; ratios end in ``_ratio``. The prefix stays ``zipcache_``: the colon
of vLLM's ``vllm:`` is reserved for recording rules in Prometheus' naming rules. Two sources:

* :class:`ZipCacheStatLogger`, the ``vllm.stat_logger_plugins`` entry point ``zipcache``,
  without any RPC: the layout figures from the engine's config (``zipcache_info``, bytes
  per token, capacity, page compression ratio, staging slots) once the engine is up, and
  ``zipcache_kv_blocks_in_use`` from the ``SchedulerStats`` vLLM hands every stat logger
  after each engine step (``kv_cache_usage`` x the usable blocks).
* :func:`set_worker_gauges`: tokens stored, staging slots in use and the measured
  compression ratio. They depend on each running request's computed tokens and on the
  staging pool, which live in the worker; ``SchedulerStats`` carries neither (request
  counts, block usage, prefix-cache, spec-decode and connector counters only), so these
  keep the worker RPC behind ``GET /zipcache/stats`` (``endpoints.py``): every
  ``ZIPCACHE_METRICS_INTERVAL_S`` seconds while an engine has running requests, never while
  every engine is idle (:func:`engines_idle`: nothing stored, so no RPC is needed).

vLLM loads stat-logger plugins in the API server when ``VLLM_PLUGINS`` is unset or names
them; an installed one keeps vLLM's stats on even under ``--disable-log-stats`` (vLLM logs
that it does). Gauges use ``multiprocess_mode="mostrecent"`` like vLLM's own, so several
API server processes publish one value.
"""
from __future__ import annotations

# vLLM's interface for stat-logger plugins (its docstring: "API users may define custom
# loggers that implement this interface"). Imported here, not through compat.py: vLLM's
# loader raises TypeError, outside its try, for a plugin class that does not derive from
# it, so this module must load on every vLLM version that has the plugin group, including
# those compat.py refuses (there the logger stays inert, see ``plugin.vllm_version_problem``).
from vllm.v1.metrics.loggers import StatLoggerBase

from .plugin import logger

LABELS = ("model_name", "engine")

ENGINE_GAUGES = {  # set by ZipCacheStatLogger, no RPC
    "zipcache_kv_bytes_per_token": "KV bytes per token, all layers and workers, every part of the page counted",
    "zipcache_kv_capacity_tokens": "tokens the KV cache holds (vLLM blocks x block size)",
    "zipcache_kv_blocks_in_use": "KV blocks held by running requests (vLLM's kv_cache_usage x usable blocks)",
    "zipcache_staging_slots": "full-precision staging slots per worker (max_num_seqs + 1)",
    "zipcache_kv_page_compression_ratio": "bf16 page bytes / zipcache page bytes (layout, staging excluded)",
}
WORKER_GAUGES = {  # set from the workers' stats (RPC)
    "zipcache_kv_tokens_stored": "tokens in the KV blocks of running requests",
    "zipcache_staging_slots_in_use": "staging slots held by running requests",
    "zipcache_kv_measured_compression_ratio":
        "bf16 bytes of the stored tokens / bytes they hold (pages + staging); absent while empty",
}
INFO = "zipcache_info"

_GAUGES: dict | None = None
# engine label -> running requests in the last SchedulerStats this process recorded
_running: dict[str, int] = {}


def gauges() -> dict:
    """The gauges, created once per process (``zipcache_info`` adds dtype and preset labels)."""
    global _GAUGES
    if _GAUGES is None:
        from prometheus_client import Gauge

        kw = {"labelnames": list(LABELS), "multiprocess_mode": "mostrecent"}
        _GAUGES = {name: Gauge(name, doc, **kw) for name, doc in {**ENGINE_GAUGES, **WORKER_GAUGES}.items()}
        _GAUGES[INFO] = Gauge(INFO, "KV cache dtype and zipcache preset (value 1)",
                              labelnames=[*LABELS, "kv_cache_dtype", "preset"],
                              multiprocess_mode="mostrecent")
    return _GAUGES


def _set(name: str, labels: tuple[str, str], value: float | None) -> None:
    """Set one series; ``None`` removes it (a value that does not exist right now)."""
    gauge = gauges()[name]
    if value is None:
        try:
            gauge.remove(*labels)
        except KeyError:
            pass
    else:
        gauge.labels(*labels).set(value)


def layout_figures(vllm_config) -> dict:
    """What the served config fixes: preset, bytes per token (all layers, all workers), page
    compression ratio and staging slots; zipcache dtypes only (``{}`` for vLLM's own).

    Read off the config the way the worker builds it: per-rank KV heads and head size from
    vLLM's ``ModelConfig``, the page from the preset's layout (``planner.capacity.zipcache_layout``,
    the backend's), one page per layer (zipcache serves dense attention only, every layer)."""
    from ..engine.staging import MARGIN
    from ..planner.capacity import zipcache_layout
    from ..dtypes import is_zipcache_dtype, preset_for_dtype

    cache_dtype = vllm_config.cache_config.cache_dtype
    if not is_zipcache_dtype(cache_dtype):
        return {}
    model, parallel = vllm_config.model_config, vllm_config.parallel_config
    preset = preset_for_dtype(cache_dtype)
    heads, head_size = model.get_num_kv_heads(parallel), model.get_head_size()
    layout = zipcache_layout(preset, head_size, heads)
    bf16_page = 2 * heads * head_size * model.dtype.itemsize * layout.block_size
    return {
        "preset": preset.name,
        "bytes_per_token": (model.get_total_num_hidden_layers() * parallel.tensor_parallel_size
                            * layout.page_bytes / layout.block_size),
        "page_compression_ratio": bf16_page / layout.page_bytes,
        "staging_slots": vllm_config.scheduler_config.max_num_seqs + MARGIN,
    }


class ZipCacheStatLogger(StatLoggerBase):
    """vLLM stat logger (one per engine): the engine gauges, without asking the workers.

    Inert on a vLLM the plugin does not support. A failure is logged once and turns the
    logger off: metrics must never take the server down (``record`` runs in vLLM's output
    loop)."""

    def __init__(self, vllm_config, engine_index: int = 0):
        from .plugin import vllm_version_problem

        self.vllm_config = vllm_config
        self.engine = str(engine_index)
        self.active = vllm_version_problem() is None
        if self.active:
            self._guard(self._start)

    def _guard(self, step, *args) -> None:
        try:
            step(*args)
        except Exception as exc:
            self.active = False
            logger.warning("zipcache metrics turned off for engine %s: %s: %s",
                            self.engine, type(exc).__name__, exc)

    def _start(self) -> None:
        cfg = self.vllm_config
        self.labels = (str(cfg.model_config.served_model_name), self.engine)
        self.figures = layout_figures(cfg)
        self.usable_blocks = 0
        _running[self.engine] = 0  # a new engine holds nothing; vLLM reports steps, not idleness
        _set(INFO, (*self.labels, cfg.cache_config.cache_dtype, self.figures.get("preset") or "none"), 1)
        _set("zipcache_kv_bytes_per_token", self.labels, self.figures.get("bytes_per_token"))
        _set("zipcache_kv_page_compression_ratio", self.labels, self.figures.get("page_compression_ratio"))
        _set("zipcache_staging_slots", self.labels, self.figures.get("staging_slots"))

    def log_engine_initialized(self) -> None:
        if self.active:
            self._guard(self._engine_initialized)

    def _engine_initialized(self) -> None:
        cache = self.vllm_config.cache_config
        num_blocks = cache.num_gpu_blocks or 0
        self.usable_blocks = max(num_blocks - 1, 0)  # vLLM's block pool keeps one null block
        _set("zipcache_kv_capacity_tokens", self.labels, num_blocks * cache.block_size)

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
        if self.active and scheduler_stats is not None:
            self._guard(self._record, scheduler_stats)

    def _record(self, scheduler_stats) -> None:
        _running[self.engine] = scheduler_stats.num_running_reqs
        blocks = round(scheduler_stats.kv_cache_usage * self.usable_blocks)
        _set("zipcache_kv_blocks_in_use", self.labels, blocks)


def engines_idle() -> bool | None:
    """True when no engine has had a running request since its last scheduler stats (or
    since it started), None without a stat logger in this process."""
    if not _running:
        return None
    return not any(_running.values())


def set_worker_gauges(workers: list[dict], model_name: str) -> None:
    """Set the worker-state gauges of each engine from ``zipcache_stats`` worker dicts."""
    from .kv_stats import by_engine, combine

    for engine, group in by_engine(workers).items():
        stats = combine(group)
        labels = (str(model_name), str(engine))
        _set("zipcache_kv_tokens_stored", labels, stats["tokens_stored"])
        _set("zipcache_staging_slots_in_use", labels, stats["staging_blocks_in_use"])
        _set("zipcache_kv_measured_compression_ratio", labels, stats["measured_compression"])


def set_idle(model_name: str) -> None:
    """What an idle engine stores, without asking its workers: nothing."""
    for engine in _running:
        labels = (str(model_name), engine)
        _set("zipcache_kv_tokens_stored", labels, 0)
        _set("zipcache_staging_slots_in_use", labels, 0)
        _set("zipcache_kv_measured_compression_ratio", labels, None)
