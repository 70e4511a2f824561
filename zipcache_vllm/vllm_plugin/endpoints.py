"""The operator's view: a vLLM endpoint plugin adding ``/zipcache/*`` routes.

vLLM 0.32 loads ``vllm.endpoint_plugins`` entry points in the API server process only when
they are named in ``VLLM_PLUGINS`` (opt-in: routes widen the network surface). ``setup.py``
registers this one as ``zipcache``, the name of the general and stat-logger plugins too.
A ``VLLM_PLUGINS`` list also limits every other plugin group (general, platform, stat
logger), so name vLLM's default plugins beside ours; ``zipcache-vllm serve`` does
(``cli.vllm_plugins``)::

    VLLM_PLUGINS=zipcache,lora_filesystem_resolver vllm serve MODEL --kv-cache-dtype zipcache

* ``GET /zipcache/stats``: preset, bytes per token, tokens stored, staging blocks in
  use, measured compression. Worker data come from ``engine_client.collective_rpc
  ("zipcache_stats")`` (``worker_ext.ZipCacheWorkerExtension``, installed by default for
  zipcache dtypes, see ``plugin.py``), on demand.
* ``POST /zipcache/plan``: the capacity planner (:mod:`zipcache_vllm.planner.plan`) over
  HTTP. ``model`` is ``"served"`` (this server's model) or a bundled architecture name;
  invalid input answers 422 with ``detail[].loc`` naming the field (FastAPI's format;
  vLLM's global handler would turn validation errors into 400, so the body is validated
  here).
* The worker-state gauges of ``metrics.py`` (tokens stored, staging slots in use, measured
  compression ratio): the one thing the stat-logger interface cannot carry (see there),
  refreshed through the same RPC every ``ZIPCACHE_METRICS_INTERVAL_S`` seconds (default 5;
  0 turns the refresh off) while an engine has running requests, and on every stats call.

``--api-key`` (or ``VLLM_API_KEY``) guards these routes too: vLLM's own middleware only
guards ``/v1``-style prefixes, so the routes check the bearer token themselves, the same
way (401 without it). On a vLLM the plugin does not support, the plugin adds nothing.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import secrets
from typing import Optional

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError, field_validator

from ..planner.model_spec import bundled_models, spec_from_config
from ..planner.plan import Plan, PlanError, PlanRequest, make_plan
from . import metrics
from .kv_stats import combine

PREFIX = "/zipcache"
RPC_TIMEOUT_S = 30.0
DEFAULT_INTERVAL_S = 5.0


class StatsResponse(BaseModel):
    """``GET /zipcache/stats``. Token and block counts are those of the first worker (every
    worker sees the same requests); bytes per token and compression cover all workers."""

    kv_cache_dtype: str
    preset: Optional[str] = Field(description="zipcache preset, None for other dtypes")
    bytes_per_token: Optional[float] = Field(description="KV bytes per token, all layers and workers")
    page_compression: Optional[float] = Field(description="bf16 page bytes / zipcache page bytes")
    capacity_tokens: int
    tokens_stored: int = Field(description="tokens in the KV blocks of running requests")
    blocks_in_use: int
    requests: int = Field(description="running requests holding KV blocks")
    staging_slots: int
    staging_blocks_in_use: int
    measured_compression: Optional[float] = Field(
        description="bf16 bytes of the stored tokens / bytes they hold (pages + staging); None when empty")
    workers: list[dict] = Field(description="raw per-worker stats")
    error: Optional[str] = Field(None, description="why worker stats are missing, if they are")


class PlanHTTPRequest(PlanRequest):
    """``POST /zipcache/plan``: a :class:`PlanRequest` whose model is this server's or a bundled one."""

    model: str = Field("served", description="'served' (this server's model) or a bundled architecture")

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str) -> str:
        if name != "served" and name not in bundled_models():
            raise ValueError(f"model must be 'served' or one of {', '.join(bundled_models())}")
        return name


def _api_keys(request: Request) -> list[str]:
    args = getattr(request.app.state, "args", None)
    keys = getattr(args, "api_key", None) or [os.environ.get("VLLM_API_KEY")]
    if isinstance(keys, str):
        keys = [keys]
    return [k for k in keys if k]


async def require_api_key(request: Request) -> None:
    """401 unless the bearer token is one of ``--api-key`` / ``VLLM_API_KEY`` (when set)."""
    keys = _api_keys(request)
    if not keys:
        return
    scheme, _, token = (request.headers.get("Authorization") or "").partition(" ")
    given = hashlib.sha256(token.encode()).digest()
    ok = scheme.lower() == "bearer" and any(
        secrets.compare_digest(given, hashlib.sha256(k.encode()).digest()) for k in keys)
    if not ok:
        raise HTTPException(status_code=401, detail="Unauthorized")


router = APIRouter(prefix=PREFIX, tags=["zipcache"], dependencies=[Depends(require_api_key)])


def _engine(request: Request):
    engine = getattr(request.app.state, "engine_client", None)
    if engine is None:
        raise HTTPException(status_code=503, detail="no engine (render-only server)")
    return engine


async def worker_stats(engine) -> list[dict]:
    """Every worker's ``zipcache_stats`` (one RPC through the engine core)."""
    return await asyncio.wait_for(engine.collective_rpc("zipcache_stats"), RPC_TIMEOUT_S)


def _unavailable(exc: Exception) -> str:
    return (f"worker stats unavailable ({type(exc).__name__}: {exc}); zipcache dtypes install the "
            "worker extension by default, others need --worker-extension-cls "
            "zipcache_vllm.vllm_plugin.worker_ext.ZipCacheWorkerExtension")


async def collect_stats(engine) -> StatsResponse:
    """Ask every worker for its stats and combine them."""
    cache_dtype = engine.vllm_config.cache_config.cache_dtype
    error = None
    try:
        workers = await worker_stats(engine)
    except Exception as exc:  # an engine without the worker extension, or one that is busy/dead
        workers, error = [], _unavailable(exc)
    return StatsResponse(kv_cache_dtype=cache_dtype, **combine(workers), workers=workers, error=error)


@router.get("/stats", response_model=StatsResponse)
async def get_stats(request: Request) -> StatsResponse:
    engine = _engine(request)
    stats = await collect_stats(engine)
    if stats.workers:
        metrics.set_worker_gauges(stats.workers, engine.model_config.served_model_name)
    return stats


def _unprocessable(errors: list[dict]) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": errors})


def _served_spec(engine):
    model_config = engine.model_config
    spec = spec_from_config(model_config.hf_config.to_dict(), model_config.served_model_name or "served")
    return dataclasses.replace(spec, dtype=str(model_config.dtype).removeprefix("torch."))


@router.post("/plan", response_model=Plan, openapi_extra={"requestBody": {"required": True, "content": {
    "application/json": {"schema": PlanHTTPRequest.model_json_schema()}}}})
async def post_plan(request: Request):
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return _unprocessable([{"loc": ["body"], "msg": f"invalid JSON: {exc}", "type": "json_invalid"}])
    try:
        req = PlanHTTPRequest.model_validate(body)
    except ValidationError as exc:
        return _unprocessable(json.loads(exc.json(include_url=False, include_context=False)))
    try:
        spec = _served_spec(_engine(request)) if req.model == "served" else None
        return make_plan(req, spec)
    except PlanError as exc:
        return _unprocessable([{"loc": ["body", exc.field], "msg": str(exc), "type": "value_error"}])


class ZipCacheEndpoints:
    """The ``vllm.endpoint_plugins`` entry point (vLLM's ``EndpointPlugin`` protocol)."""

    name = "zipcache"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        from .plugin import vllm_version_problem

        if vllm_version_problem() is None:
            app.include_router(router)

    async def init_state(self, engine_client, state, args) -> None:
        from .plugin import vllm_version_problem

        interval = float(os.environ.get("ZIPCACHE_METRICS_INTERVAL_S", DEFAULT_INTERVAL_S))
        if engine_client is None or interval <= 0 or vllm_version_problem() is not None:
            return
        self._task = asyncio.get_running_loop().create_task(refresh_worker_gauges(engine_client, interval))


async def refresh_worker_gauges(engine, interval: float) -> None:
    """The worker-state gauges every ``interval`` seconds; no RPC while every engine is idle
    (the stat logger's last scheduler stats: no running request, nothing stored). Never
    raises. Stops, with one warning, when the workers cannot answer (no worker extension:
    a vLLM dtype served without ``--worker-extension-cls``); a timeout only skips a round."""
    from .plugin import logger

    model_name = engine.model_config.served_model_name
    warned = False
    while True:
        try:
            if metrics.engines_idle():
                metrics.set_idle(model_name)
            else:
                metrics.set_worker_gauges(await worker_stats(engine), model_name)
        except asyncio.TimeoutError as exc:  # a busy engine: try again next time
            if not warned:
                logger.warning("zipcache metrics refresh failed: %s", _unavailable(exc))
                warned = True
        except Exception as exc:  # no worker extension (or a dead engine): asking again cannot help
            logger.warning("zipcache worker metrics off: %s", _unavailable(exc))
            return
        await asyncio.sleep(interval)
