"""``zipcache-vllm bench decode``: the bytes model, the table and the RESULTS.md section.

The engine runs themselves are measured by the command (docs/RESULTS.md); here the
arithmetic it prints is checked against the layout dataclass and by hand.
"""
from __future__ import annotations

import pytest

from zipcache_vllm import engine_proc
from zipcache_vllm.bench import decode
from zipcache_vllm.layout import BlockLayout
from zipcache_vllm.dtypes import preset_for_dtype

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


def test_table_without_auto_has_no_ratio_columns():
    """`auto` is the baseline: a run without it prints speeds and bytes, no empty ratio
    columns, and every row has as many cells as its header."""
    res = _result()
    del res["engines"]["auto"]
    table = decode.format_table(res)
    assert "/ auto" not in table.split("Decode", 1)[1]
    tables = [line for line in table.splitlines() if line.startswith("|")]
    widths = {line.count("|") for line in tables[:4]}
    assert len(widths) == 1  # decode header, separator and rows line up
    assert len(tables) == 8


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
    """Enough of vLLM's LLMEngine for the bench worker: every request gets one token per
    step until ``max_tokens``; ``log`` records which engine stepped, in order."""

    def __init__(self, name, log):
        self.name, self.log, self.live = name, log, {}

    def add_request(self, rid, prompt, params):
        self.live[rid] = [0, params.max_tokens]

    def has_unfinished_requests(self):
        return bool(self.live)

    def step(self):
        from types import SimpleNamespace

        if not self.log or self.log[-1] != self.name:
            self.log.append(self.name)
        outs = []
        for rid, st in list(self.live.items()):
            st[0] += 1
            outs.append(SimpleNamespace(request_id=rid, num_cached_tokens=0,
                                        outputs=[SimpleNamespace(token_ids=[0] * st[0])]))
            if st[0] >= st[1]:
                del self.live[rid]
        return outs


def _engines(names):
    log = []
    return {n: _FakeEngine(n, log) for n in names}, log


def test_cell_runs_engines_in_rotating_rounds():
    """Each round runs every engine once, the first engine rotating from round to round (and
    from cell to cell with ``turn``); decode counts every round's tokens after the first."""
    from zipcache_vllm.bench import decode_worker

    engines, log = _engines(["auto", "fp8", "zipcache"])
    rows = decode_worker.measure_cell(engines, 64, 2, 4, rounds=3, pause_s=0)
    assert log == ["auto", "fp8", "zipcache", "fp8", "zipcache", "auto", "zipcache", "auto", "fp8"]
    for row in rows.values():
        assert row["decode_tokens"] == 3 * 2 * 4 and len(row["rounds"]) == 3
        assert len(row["prefill_samples_s"]) == 1 and len(row["hit_prefill_s"]) == 2
        assert row["decode_tok_s"] == row["decode_tokens"] / row["decode_s"]
    engines, log = _engines(["auto", "zipcache"])
    decode_worker.measure_cell(engines, 64, 1, 2, rounds=1, pause_s=0, turn=1)
    assert log == ["zipcache", "auto"]


def test_prefill_is_the_median_of_the_batch_one_runs():
    from zipcache_vllm.bench import decode_worker

    engines, log = _engines(["auto", "zipcache"])
    row = decode_worker.measure_cell(engines, 64, 1, 4, rounds=2, prefill_reps=3, pause_s=0)["zipcache"]
    assert len(row["prefill_samples_s"]) == 3
    assert row["prefill_s"] == sorted(row["prefill_samples_s"])[1]
    assert row["prefill_tok_s"] == 64 / row["prefill_s"] and row["decode_tokens"] == 8
    engines, _ = _engines(["auto"])
    batch = decode_worker.measure_cell(engines, 64, 2, 4, rounds=1, prefill_reps=3, pause_s=0)["auto"]
    assert len(batch["prefill_samples_s"]) == 1  # repeated at batch 1 only
    res = _result()
    res["info"]["prefill_reps"] = 3
    assert "batch 1: the median of 3 prompts" in decode.format_table(res)


def test_table_shows_the_range_of_per_round_ratios():
    res = _result()
    res["info"]["rounds"] = 2
    for d, speeds in (("auto", (10.0, 20.0)), ("zipcache", (12.0, 30.0))):
        for row in res["engines"][d]["rows"]:
            row["rounds"] = [[s, 1.0] for s in speeds]
    assert decode.round_ratios(res["engines"]["zipcache"]["rows"][0],
                               res["engines"]["auto"]["rows"][0]) == [1.2, 1.5]
    table = decode.format_table(res)
    assert "1.50x (1.20-1.50)" in table and "over 2 rounds" in table


def test_run_keeps_a_refused_dtype_and_the_order_asked(monkeypatch, tmp_path):
    """One worker runs every dtype; the result keeps the order asked and a refusal."""
    calls = []

    def fake_worker(model_dir, dtypes, ctxs, batches, decode_tokens, rounds, workdir, kv_space,
                    prefill_reps=1, progress=True, profile=False):
        calls.append((list(dtypes), list(ctxs), rounds))
        rows = [{"ctx": c, "batch": b} for c in ctxs for b in batches]
        return {"zipcache": {"kv_cache_dtype": "zipcache", "num_gpu_blocks": 7, "block_size": 16,
                             "rows": rows},
                "fp8": {"kv_cache_dtype": "fp8", "unsupported": "FP8 KV cache on CPU requires AVX-512"},
                "auto": {"kv_cache_dtype": "auto", "rows": rows}}

    monkeypatch.setattr(decode, "run_worker", fake_worker)
    monkeypatch.setattr(decode, "model_facts", lambda m: {"layers": 1})
    monkeypatch.setattr("zipcache_vllm.bench.kernels.copy_bandwidth", lambda: 1.0)
    res = decode.run(str(tmp_path), ["auto", "fp8", "zipcache"], [1024, 4096], [1, 8], 4, "1",
                     progress=False, rounds=5)
    assert calls == [(["auto", "fp8", "zipcache"], [1024, 4096], 5)]
    assert list(res["engines"]) == ["auto", "fp8", "zipcache"]
    assert res["info"]["rounds"] == 5 and res["engines"]["zipcache"]["num_gpu_blocks"] == 7
    assert "unsupported" in res["engines"]["fp8"]


def test_bad_counts_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--rounds"):
        decode.main(str(tmp_path), "auto", "64", "1", 4, False, "1", None, None, rounds=0)


# --------------------------------------------------------------------------- slow

@pytest.mark.slow
@pytest.mark.engine
def test_engines_side_by_side_through_vllm(model_dir):
    """The real worker: two engines alive in one process, rounds of prefix-cache hits
    (the re-run prompts prefill only their last block), every token counted."""
    res = decode.run(str(model_dir), ["auto", "zipcache"], [384], [1, 2], 4, 2**30, progress=False,
                     rounds=2)
    print(decode.format_table(res))
    for d in ("auto", "zipcache"):
        eng = res["engines"][d]
        assert eng["num_gpu_blocks"] > 0 and [(r["ctx"], r["batch"]) for r in eng["rows"]] == [
            (384, 1), (384, 2)]
        for row in eng["rows"]:
            assert len(row["rounds"]) == 2 and row["decode_tok_s"] > 0
            # every request decodes 4 tokens a round; at batch 2 a step may finish one
            # request's first token before the other's, so at least 3 count
            assert all(3 * row["batch"] <= n <= 4 * row["batch"] for n, _ in row["rounds"])
            # round 0 is cold; round 1 takes the first two 128-token blocks of each prompt
            # from the prefix cache (vLLM recomputes the block with the last prompt token)
            assert row["cached_tokens"] == [0, 256 * row["batch"]]
    assert "over 2 rounds" in decode.format_table(res)


def test_a_worker_past_its_time_is_stopped_and_reported(monkeypatch, tmp_path):
    """The worker runs in its own process; past ``timeout`` it is killed and the error
    says so (with its log), instead of the bench waiting for ever."""
    import subprocess
    import sys

    real_popen = subprocess.Popen

    def sleeper(cmd, **kw):
        return real_popen([sys.executable, "-c", "print('engine starting', flush=True); "
                           "import time; time.sleep(60)"], **kw)

    monkeypatch.setattr(engine_proc.subprocess, "Popen", sleeper)
    with pytest.raises(RuntimeError, match="timed out after 1 s") as exc:
        decode.run_worker(str(tmp_path), ["auto"], [64], [1], 2, 1, tmp_path, "1", timeout=1,
                          progress=False)
    assert "engine starting" in str(exc.value)


def test_step_profile_reads_torch_s_table():
    """The op table vLLM's worker writes (torch's key_averages format) as ms per decode
    step: steps counted by vLLM's attention entry point, one call per layer per step."""
    from zipcache_vllm.bench import step_profile

    dash = "-" * 40 + "  " + "  ".join(["-" * 12] * 6) + "  "
    head = ("Name".rjust(40) + "  " + "  ".join(c.rjust(12) for c in (
        "Self CPU %", "Self CPU", "CPU total %", "CPU total", "CPU time avg", "# of Calls")) + "  ")

    def row(name, self_t, calls):
        return name.rjust(40) + "  " + "  ".join(c.rjust(12) for c in (
            "1.00%", self_t, "1.00%", self_t, "1.0us", str(calls))) + "  "

    text = "\n".join([dash, head, dash,
                      row("_C::onednn_mm", "264.062ms", 1210),
                      row("zipcache::decode_staged", "124.837ms", 300),
                      row("vllm::unified_attention_with_output", "20.048ms", 300),
                      row("aten::copy_", "7926.000us", 3840),
                      dash, "Self CPU time total: 0.632s", ""])
    rows, total = step_profile.parse_table(text)
    assert rows[1] == ("zipcache::decode_staged", 124.837, 300) and total == 632.0
    assert rows[3] == ("aten::copy_", 7.926, 3840)
    prof = step_profile.summarize(text, layers=30, top=2)
    assert prof["steps"] == 10 and prof["step_ms"] == pytest.approx(63.2)
    assert [op[0] for op in prof["ops"]] == ["_C::onednn_mm", "zipcache::decode_staged"]
    assert prof["ops"][0][1] == pytest.approx(26.4062) and prof["ops"][0][2] == pytest.approx(264.062 / 632)
    with pytest.raises(ValueError, match="cannot count steps"):
        step_profile.summarize(text, layers=7)
    with pytest.raises(ValueError, match="no profiler table"):
        step_profile.parse_table("nothing here")
    res = _result()
    res["engines"]["zipcache"]["profile"] = {"ctx": 1024, "batch": 1, **prof}
    md = step_profile.format_profiles(res["engines"])
    assert "`zipcache`: 63.2 ms" in md and "| `_C::onednn_mm` | 26.41 | 42% |" in md
