"""``zipcache-vllm bench decode``: the bytes model, the table and the RESULTS.md section.

The engine runs themselves are measured by the command (docs/RESULTS.md); here the
arithmetic it prints is checked against the layout dataclass and by hand.
"""
from __future__ import annotations

import pytest

from zipcache_vllm.bench import decode
from zipcache_vllm.layout import BlockLayout
from zipcache_vllm.vllm_plugin.dtypes import preset_for_dtype

FACTS = {"layers": 30, "kv_heads": 3, "head_size": 64, "weights_bytes": 269_000_000}


def test_kv_bytes_model():
    assert decode.kv_bytes_per_request("auto", 1000, FACTS) == 30 * 1000 * 3 * 64 * 4
    assert decode.kv_bytes_per_request("fp8", 1000, FACTS) == 30 * 1000 * 3 * 64 * 2
    layout = BlockLayout.from_preset(preset_for_dtype("zipcache"), head_size=64, num_kv_heads=3)
    ctx = 5 * layout.block_size + 7
    assert decode.kv_bytes_per_request("zipcache", ctx, FACTS) == 30 * (
        5 * layout.page_bytes + 7 * 3 * 64 * 4)
    # the packed cache reads less than a quarter of bf16 at long context
    assert decode.kv_bytes_per_request("zipcache", 8064, FACTS) < 0.25 * decode.kv_bytes_per_request(
        "auto", 8064, FACTS)


def _result():
    rows = lambda f: [{"ctx": 1024, "batch": b, "prefill_tok_s": 100.0 * f, "decode_tok_s": 10.0 * b * f,
                       "prefill_s": 1.0, "decode_s": 1.0, "decode_tokens": 8, "steps": 9} for b in (1, 8)]
    return {"info": {"cpu": "test cpu", "cpus": 2, "bandwidth_gb_s": 10.0, "load": 0.5, "kv_space_gib": "2",
                     "decode_tokens": 8, "model": "m", **FACTS},
            "engines": {"auto": {"rows": rows(1.0)},
                        "fp8": {"unsupported": "FP8 KV cache on CPU requires x86 with AVX-512 or AMX."},
                        "zipcache": {"rows": rows(1.5)}}}


def test_table_ratios_and_refusal():
    table = decode.format_table(_result())
    assert "`fp8`: not run" in table and "AVX-512" in table
    decode_rows = [line for line in table.splitlines() if line.startswith("| 1024 |")]
    assert len(decode_rows) == 4  # two decode rows, two prefill rows
    assert "1.50x" in decode_rows[0] and "1.50x" in decode_rows[2]
    # bytes model column: weights + KV of one request at 1024 tokens, auto
    mb = (FACTS["weights_bytes"] + decode.kv_bytes_per_request("auto", 1024, FACTS)) / 1e6
    assert f"| {mb:.0f}, " in decode_rows[0]


def test_update_results_replaces_only_its_section(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nintro\n")
    decode.update_results(md, "zipcache-vllm bench decode", "table one")
    decode.update_results(md, "zipcache-vllm bench decode", "table two")
    text = md.read_text()
    assert text.startswith("# Results\n\nintro\n")
    assert "table two" in text and "table one" not in text
    assert text.count(decode.RESULTS_BEGIN) == 1 and text.count(decode.RESULTS_END) == 1


@pytest.mark.parametrize("argv", [["bench", "decode", "--help"]])
def test_cli_lists_decode(argv, capsys):
    from zipcache_vllm.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert "--update-results" in capsys.readouterr().out


def test_render_a_saved_run_into_results(tmp_path, capsys):
    import json

    saved = tmp_path / "run.json"
    res = _result()
    res["info"]["command"] = "zipcache-vllm bench decode --contexts 1024"
    saved.write_text(json.dumps(res))
    md = tmp_path / "RESULTS.md"
    assert decode.main(None, "", None, None, 0, False, "2", None, str(md), render=str(saved)) == 0
    text = md.read_text()
    assert "--contexts 1024" in text and f"--render {saved}" in text
    assert "1.50x" in capsys.readouterr().out


class _FakeEngine:
    """Enough of vLLM's LLMEngine for ``decode_worker.measure``: every request gets one token
    per step until ``max_tokens``."""

    def __init__(self):
        self.live = {}

    def add_request(self, rid, prompt, params):
        self.live[rid] = [0, params.max_tokens]

    def has_unfinished_requests(self):
        return bool(self.live)

    def step(self):
        from types import SimpleNamespace

        outs = []
        for rid, st in list(self.live.items()):
            st[0] += 1
            outs.append(SimpleNamespace(request_id=rid, outputs=[SimpleNamespace(token_ids=[0] * st[0])]))
            if st[0] >= st[1]:
                del self.live[rid]
        return outs


def test_prefill_is_the_median_of_the_batch_one_runs():
    from zipcache_vllm.bench import decode_worker

    row = decode_worker.measure(_FakeEngine(), 64, 1, 4, "t", prefill_reps=3)
    assert len(row["prefill_samples_s"]) == 3
    assert row["prefill_s"] == sorted(row["prefill_samples_s"])[1]
    assert row["prefill_tok_s"] == 64 / row["prefill_s"] and row["decode_tokens"] == 4
    batch = decode_worker.measure(_FakeEngine(), 64, 2, 4, "t", prefill_reps=3)
    assert len(batch["prefill_samples_s"]) == 1  # repeated at batch 1 only
    res = _result()
    res["info"]["prefill_reps"] = 3
    assert "batch 1: the median of 3 prompts" in decode.format_table(res)


def test_engines_run_context_by_context_and_merge_per_dtype(monkeypatch, tmp_path):
    """Every dtype runs once per context, dtypes in turn within a context; rows merge per
    dtype in context order, and a refused dtype stays refused."""
    from zipcache_vllm.bench import decode

    calls = []

    def fake_worker(model_dir, d, ctxs, batches, decode_tokens, workdir, kv_space, prefill_reps=1):
        calls.append((ctxs[0], d))
        if d == "fp8":
            return {"kv_cache_dtype": d, "unsupported": "FP8 KV cache on CPU requires AVX-512"}
        return {"kv_cache_dtype": d, "num_gpu_blocks": 7, "block_size": 16,
                "rows": [{"ctx": ctxs[0], "batch": b} for b in batches]}

    monkeypatch.setattr(decode, "run_worker", fake_worker)
    monkeypatch.setattr(decode, "model_facts", lambda m: {"layers": 1})
    monkeypatch.setattr("zipcache_vllm.bench.kernels.copy_bandwidth", lambda: 1.0)
    res = decode.run(str(tmp_path), ["auto", "fp8", "zipcache"], [1024, 4096], [1, 8], 4, "1",
                     progress=False)
    assert calls == [(1024, "auto"), (1024, "fp8"), (1024, "zipcache"),
                     (4096, "auto"), (4096, "fp8"), (4096, "zipcache")]
    assert list(res["engines"]) == ["auto", "fp8", "zipcache"]
    assert [(r["ctx"], r["batch"]) for r in res["engines"]["zipcache"]["rows"]] == [
        (1024, 1), (1024, 8), (4096, 1), (4096, 8)]
    assert res["engines"]["zipcache"]["num_gpu_blocks"] == 7
    assert "unsupported" in res["engines"]["fp8"]
