"""``zipcache-vllm bench serve``: parsing and tables (fast), the quick mode end to end (slow).

The slow test runs the quick load against one real ``vllm serve`` per dtype and
asserts only what must hold: every request completes, the compressed caches hold more
tokens than ``auto`` at the same byte budget, and the budget is small enough that
``auto`` has to queue. It serves ``auto``, ``fp8`` (refused on CPUs without
AVX-512/AMX), the default preset and the most compressed one: every preset already
starts the real engine in tests/tools/test_engine_eval.py, and a server start costs ~30 s of
the CI budget (``zipcache-vllm bench serve --quick`` itself runs every preset).
"""
from __future__ import annotations

import pytest

from zipcache_vllm.bench import serve

METRICS = """# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="model"} 7.0
vllm:num_requests_running{engine="0",model_name="model"} 3.0
vllm:num_requests_waiting{engine="0",model_name="model"} 1e+01
"""


def test_metric_reads_prometheus_samples():
    assert serve.metric(METRICS, "vllm:num_preemptions_total") == 7.0
    assert serve.metric(METRICS, "vllm:num_requests_waiting") == 10.0
    assert serve.metric(METRICS, "vllm:num_requests") == 0.0  # a prefix is not a match


def test_percentiles_nearest_rank():
    p = serve.percentiles([float(x) for x in range(1, 101)])
    assert p == {"p50": 51.0, "p90": 90.0, "p99": 99.0}
    assert serve.percentiles([])["p50"] is None


def test_markdown_ratios_and_refusal():
    w = vars(serve.QUICK) | {}
    w = {k: getattr(serve.QUICK, k) for k in serve.QUICK.__dataclass_fields__}
    row = serve.Result("auto", kv_tokens=1000, completed=4, seconds=2.0, req_per_s=2.0, out_tok_per_s=10.0,
                       ttft_s={"p50": 0.1, "p90": 0.2, "p99": 0.3}, itl_s={"p50": 0.01, "p90": 0.02, "p99": 0.03})
    z = serve.Result("zipcache", kv_tokens=4000, completed=4, seconds=1.0, req_per_s=4.0, out_tok_per_s=20.0,
                     ttft_s={"p50": 0.1, "p90": 0.2, "p99": 0.3}, itl_s={"p50": 0.01, "p90": 0.02, "p99": 0.03})
    fp8 = serve.Result("fp8", unsupported="FP8 KV cache on CPU requires x86 with AVX-512 or AMX")
    text = serve.markdown({"workload": w, "rows": [vars(row), vars(fp8), vars(z)]}, "cmd", "m")
    assert "| zipcache | 4,000 | 4.000 | 2.00x |" in text
    assert "| fp8 | refused at startup: FP8" in text


def test_ceiling_row_is_labelled_and_not_the_baseline():
    """The `auto` run with a cache that holds the whole load is reported as the ceiling; the
    ratios stay against the memory-limited `auto`."""
    w = {k: getattr(serve.FULL, k) for k in serve.FULL.__dataclass_fields__}
    lat = {"p50": 0.1, "p90": 0.2, "p99": 0.3}
    auto = serve.Result("auto", kv_tokens=1000, req_per_s=1.0, ttft_s=lat, itl_s=lat)
    z = serve.Result("zipcache", kv_tokens=4000, req_per_s=1.5, ttft_s=lat, itl_s=lat)
    top = serve.Result("auto", kv_tokens=9000, req_per_s=1.6, ttft_s=lat, itl_s=lat, ceiling=True)
    text = serve.markdown({"workload": w, "rows": [vars(auto), vars(z), vars(top)]}, "cmd", "m")
    assert "| zipcache | 4,000 | 1.500 | 1.50x |" in text
    assert "| auto, 512 MiB (ceiling) | 9,000 | 1.600 | 1.60x |" in text
    assert "The ceiling row" in text
    assert serve.FULL.ceiling_bytes > serve.FULL.kv_bytes and serve.QUICK.ceiling_bytes == 0


def _sweep_result() -> dict:
    """Two budgets x auto, fp8 (refused) and zipcache, as ``serve.run`` returns them."""
    from dataclasses import asdict, replace

    w = replace(serve.FULL, max_num_seqs=None, sweep_bytes=(64 * 2**20, 256 * 2**20))
    lat = lambda p90: {"p50": p90 / 2, "p90": p90, "p99": p90}  # noqa: E731
    rows = []
    for b, (auto_rps, zc_rps) in zip(w.sweep_bytes, ((1.0, 2.5), (2.0, 2.1))):
        rows += [serve.Result("auto", kv_tokens=b // 23040, req_per_s=auto_rps, ttft_s=lat(4.0), itl_s=lat(0.1),
                              kv_bytes=b),
                 serve.Result("fp8", unsupported="FP8 KV cache on CPU requires x86 with AVX-512 or AMX", kv_bytes=b),
                 serve.Result("zipcache", kv_tokens=b // 5000, req_per_s=zc_rps, ttft_s=lat(1.0), itl_s=lat(0.1),
                              kv_bytes=b)]
    return {"workload": asdict(w), "rows": [asdict(r) for r in rows]}


def test_sweep_table_compares_each_budget_with_its_own_baseline():
    text = serve.markdown(_sweep_result(), "cmd", "m")
    assert "no `--max-num-seqs` (each server's default)" in text
    assert "| zipcache | 64 | 13,421 | 2.500 | 2.50x |" in text  # vs auto at 64 MiB
    assert "| zipcache | 256 | 53,687 | 2.100 | 1.05x |" in text  # vs auto at 256 MiB
    assert "| 64 | 1.000 · 4.00 | refused | 2.500 (2.50x auto) · 1.00 |" in text
    assert serve.CAPACITY_REFUSAL.search(
        "ValueError: To serve at least one request with the model's max seq len (512), (0.02 GiB KV "
        "cache is needed, which is larger").group(1).endswith("0.02 GiB KV cache is needed")
    assert "| 256 | 2.000 · 4.00 | refused | 2.100 (1.05x auto) · 1.00 |" in text


def test_sweep_runs_every_dtype_at_each_budget_ascending(monkeypatch):
    from dataclasses import replace

    seen = []

    def fake_bench(model_dir, name, w, prompts, progress, ceiling=False):
        seen.append((w.kv_bytes, name, ceiling))
        return serve.Result(name, kv_tokens=1, kv_bytes=w.kv_bytes)

    monkeypatch.setattr(serve, "bench_one", fake_bench)
    monkeypatch.setattr(serve, "prompts_for", lambda model_dir, w: [[1]])
    w = replace(serve.FULL, sweep_bytes=serve.byte_sizes("256M,64M"))
    res = serve.run("m", w, ["zipcache", "auto"], progress=False)
    assert seen == [(64 * 2**20, "auto", False), (64 * 2**20, "zipcache", False),
                    (256 * 2**20, "auto", False), (256 * 2**20, "zipcache", False)]  # no ceiling run
    assert [r["kv_bytes"] for r in res["rows"]] == [b for b, _, _ in seen]


def test_sweep_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    serve.plot(_sweep_result(), str(tmp_path / "sweep.png"))
    assert (tmp_path / "sweep.png").stat().st_size > 1000


def test_sweep_sizes_and_default_max_num_seqs_flags():
    import argparse

    assert serve.byte_sizes("128M, 64M,1G") == (64 * 2**20, 128 * 2**20, 2**30)
    with pytest.raises(ValueError):
        serve.byte_sizes(",")
    p = argparse.ArgumentParser()
    serve.add_parser(p.add_subparsers())
    args = p.parse_args(["serve", "--sweep-kv-cache-memory-bytes", "64M,256M", "--default-max-num-seqs"])
    assert args.sweep_bytes == (64 * 2**20, 256 * 2**20) and args.default_max_num_seqs
    args = p.parse_args(["serve", "--default-max-num-seqs", "--max-num-seqs", "8"])
    assert serve._cmd(args) == 2  # contradictory flags, refused before any server starts


def test_bench_serve_parser_builds_without_heavy_imports():
    import argparse
    import sys

    before = set(sys.modules)
    p = argparse.ArgumentParser()
    serve.add_parser(p.add_subparsers())
    args = p.parse_args(["serve", "--quick", "--kv-cache-dtype", "auto,zipcache", "--num-prompts", "3"])
    assert args.quick and args.requests == 3
    assert not {"torch", "vllm", "transformers"} & (set(sys.modules) - before)


# --------------------------------------------------------------------------- slow

@pytest.mark.slow
@pytest.mark.engine
def test_quick_load(model_dir, monkeypatch):
    # One preset: every preset's capacity against auto is asserted from the engine by
    # test_engine_eval.py; this test proves the load driver and its bookkeeping. Its
    # servers run vLLM's worker inside the engine core, like the other tests' servers
    # (tests/_server.py: one process fewer to start).
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    names = ["auto", "fp8", "zipcache"]
    res = serve.run(str(model_dir), serve.QUICK, names, progress=False)
    print(serve.markdown(res, "quick", ""))
    rows = {r["kv_cache_dtype"]: r for r in res["rows"]}
    assert set(rows) == set(names)
    auto = rows["auto"]
    for name, r in rows.items():
        if r["unsupported"]:  # vLLM's fp8 CPU path needs AVX-512 or AMX
            assert name == "fp8" and "AVX-512" in r["unsupported"]
            continue
        assert r["completed"] == serve.QUICK.requests and r["failed"] == 0
        assert r["ttft_s"]["p50"] > 0 and r["itl_s"]["p50"] > 0
        if name != "auto":
            assert r["kv_tokens"] > 1.2 * auto["kv_tokens"], name
    # the budget holds fewer than the clients' requests for auto: it queues
    per_request = serve.QUICK.prompt_len + serve.QUICK.output_len
    assert auto["kv_tokens"] < serve.QUICK.clients * per_request
