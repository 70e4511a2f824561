"""``zipcache-vllm bench serve``: the load as ``vllm bench serve`` sends it (``--max-concurrency``
in flight at most, ``--request-rate`` Poisson arrivals), driven against a stand-in server
(aiohttp, in process: no vLLM), and the flags it shares with vLLM."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace

import pytest

from zipcache_vllm.bench import serve

TOKENS = 3  # streamed chunks per request
TOKEN_S = 0.02


async def _stand_in(state: dict):
    """A server with vLLM's two routes the load uses: streaming completions and /metrics."""
    from aiohttp import web

    async def completions(request):
        body = await request.json()
        state["in_flight"] += 1
        state["peak"] = max(state["peak"], state["in_flight"])
        state["arrivals"].append(time.perf_counter())
        state["bodies"].append(body)
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(TOKENS):
            await asyncio.sleep(TOKEN_S)
            await resp.write(b"data: " + json.dumps({"choices": [{"text": "x"}]}).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        state["in_flight"] -= 1
        return resp

    async def metrics(request):
        return web.Response(text="vllm:num_preemptions_total 0\nvllm:num_requests_running 1\n")

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


def _drive(w: serve.Workload, prompts: int) -> tuple[dict, dict]:
    state = {"in_flight": 0, "peak": 0, "arrivals": [], "bodies": []}

    async def main():
        runner, url = await _stand_in(state)
        try:
            return await serve._drive(url, [[1, 2, 3]] * prompts, w, progress=False)
        finally:
            await runner.cleanup()

    return asyncio.run(main()), state


def test_max_concurrency_caps_requests_in_flight():
    w = replace(serve.QUICK, requests=12, clients=3, output_len=TOKENS)
    d, state = _drive(w, 12)
    assert len(d["results"]) == 12 and all(r["ok"] and r["chunks"] == TOKENS for r in d["results"])
    assert state["peak"] == 3  # all sent at once (no --request-rate), three at a time
    assert all(b["max_tokens"] == TOKENS and b["ignore_eos"] and b["stream"] for b in state["bodies"])


def test_request_rate_spaces_the_arrivals():
    """Poisson arrivals at --request-rate, drawn from --seed: request i + 1 leaves at least the
    i-th exponential gap after request i (a loaded machine only adds to it)."""
    import random

    rate, n = 40.0, 16
    w = replace(serve.QUICK, requests=n, clients=n, output_len=TOKENS, request_rate=rate, seed=3)
    draws = random.Random(3)
    expected = [draws.expovariate(rate) for _ in range(n - 1)]
    d, state = _drive(w, n)
    gaps = [b - a for a, b in zip(state["arrivals"], state["arrivals"][1:])]
    assert len(d["results"]) == n
    assert sum(gaps) >= 0.95 * sum(expected) and max(expected) > 3 * min(expected)
    unpaced, state = _drive(replace(w, request_rate=None), n)
    assert state["arrivals"][-1] - state["arrivals"][0] < sum(expected) / 2  # --request-rate inf: at once


def test_flags_are_vllm_s():
    import argparse

    p = argparse.ArgumentParser()
    serve.add_parser(p.add_subparsers())
    args = p.parse_args(["serve", "--kv-cache-dtype", "auto,zipcache", "--num-prompts", "9", "--max-concurrency",
                         "4", "--request-rate", "2.5", "--input-len", "64", "--output-len", "32", "--seed", "7",
                         "--kv-cache-memory-bytes", "136M", "--max-num-seqs", "6", "--max-num-batched-tokens", "1K",
                         "--max-model-len", "1K", "--ceiling-kv-cache-memory-bytes", "1G"])
    assert (args.requests, args.clients, args.request_rate, args.prompt_len, args.output_len, args.seed) == (
        9, 4, 2.5, 64, 32, 7)
    assert (args.kv_bytes, args.max_num_seqs, args.chunk, args.max_model_len, args.ceiling_bytes) == (
        136 * 2**20, 6, 1024, 1024, 2**30)
    with pytest.raises(SystemExit):
        p.parse_args(["serve", "--requests", "3"])


def test_a_load_longer_than_max_model_len_is_refused(capsys):
    from zipcache_vllm.cli import main

    assert main(["bench", "serve", "--input-len", "500", "--output-len", "100"]) == 2
    assert "--max-model-len 512" in capsys.readouterr().err
