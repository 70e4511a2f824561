"""scripts/gpu_check.sh and the benchmark behind it, checked where no GPU is: the
bandwidth table, the pytest-log parser and the markdown report, the one-line refusal
without a GPU, the benchmark's code in Triton's interpreter, that the Triton tests import
without vLLM, pydantic or yaml, and (slow) the whole script in its CPU self-test mode.
None of this measures a GPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zipcache_vllm.kernels.triton_loader import load

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
bench = load("bench")  # imports torch, not triton: the interpreter switch stays free

# torch.cuda.get_device_name spellings -> datasheet GB/s (None: card known, variant not).
CARDS = [("NVIDIA H100 80GB HBM3", 3350.0), ("NVIDIA H100 PCIe", 2000.0), ("NVIDIA H100 NVL", 3900.0),
         ("NVIDIA H200", 4800.0), ("NVIDIA H200 NVL", 4800.0), ("NVIDIA GH200 480GB", None),
         ("NVIDIA A100-SXM4-80GB", 2039.0), ("NVIDIA A100 80GB PCIe", 1935.0),
         ("NVIDIA A100-SXM4-40GB", 1555.0), ("NVIDIA L4", 300.0), ("NVIDIA L40S", 864.0),
         ("NVIDIA A10G", 600.0)]

PYTEST_LOG = """\
collecting ... collected 5 items

tests/kernels/test_triton_kernels.py::test_a[64-1] PASSED                      [ 20%]
tests/kernels/test_triton_kernels.py::test_a[128-3] FAILED                     [ 40%]
tests/kernels/test_triton_kernels.py::test_b SKIPPED (no sm_90 ptxas)          [ 60%]
tests/kernels/test_triton_kernels.py::test_c ERROR                             [ 80%]
tests/kernels/test_triton_kernels.py::test_d PASSED                            [100%]

=========================== short test summary info ============================
SKIPPED [1] tests/kernels/test_triton_kernels.py:10: no sm_90 ptxas
FAILED tests/kernels/test_triton_kernels.py::test_a[128-3] - AssertionError: Tensor-likes are not close!
ERROR tests/kernels/test_triton_kernels.py::test_c - RuntimeError: CUDA error: out of memory
"""
COLLECT_LOG = """\
tests/kernels/test_triton_kernels.py::test_a[64-1]

==================================== ERRORS ====================================
_________________ ERROR collecting tests/step/test_triton_flow.py __________________
tests/step/test_triton_flow.py:22: in <module>
    from zipcache_vllm.config import ProbeConfig
E   ModuleNotFoundError: No module named 'yaml'
=========================== short test summary info ============================
ERROR tests/step/test_triton_flow.py
1 test collected, 1 error in 0.80s
"""


def _table_widths(markdown: str) -> list[set[int]]:
    """Cell counts of each markdown table's lines (escaped pipes are not separators)."""
    tables, current = [], None
    for line in markdown.splitlines():
        if line.startswith("|"):
            if current is None:
                current = set()
                tables.append(current)
            current.add(line.replace("\\|", "").count("|"))
        else:
            current = None
    return tables


@pytest.mark.parametrize("name,gbps", CARDS)
def test_peak_bandwidth_by_gpu_name(name, gbps):
    card, peak = bench.peak_bandwidth(name)
    assert card is not None and peak == gbps


def test_unknown_gpu_has_no_peak():
    assert bench.peak_bandwidth("NVIDIA GeForce GTX 1080") == (None, None)
    assert bench.peak_bandwidth("") == (None, None)


def test_parse_pytest_log_counts_outcomes_and_messages():
    run = bench.parse_pytest_log(PYTEST_LOG)
    c = run["counts"]
    assert (c["PASSED"], c["FAILED"], c["ERROR"], c["SKIPPED"]) == (2, 1, 1, 1)
    assert len(run["seen"]) == 5
    assert ("tests/kernels/test_triton_kernels.py::test_a[128-3]",
            "FAILED: AssertionError: Tensor-likes are not close!") in run["problems"]
    collect = bench.parse_pytest_log(COLLECT_LOG)
    assert collect["counts"]["ERROR"] == 1 and not collect["seen"]
    assert collect["problems"] == [("tests/step/test_triton_flow.py",
                                    "ERROR: ModuleNotFoundError: No module named 'yaml'")]


def _env(**kw):
    env = dict(gpu="NVIDIA H100 80GB HBM3", capability="90", sms=132, memory_gib=79.1,
               driver="580.1", torch="2.9.0", torch_cuda="12.8", triton="3.5.0", python="3.12.3",
               pytest="8.4.0", commit="abc1234", date="today", selftest=False)
    env.update(kw)
    return env


META = dict(device="NVIDIA H100 80GB HBM3", interpret=False, copy_gbps=2900.0, copy_bytes=1 << 30,
            num_heads=32, num_kv_heads=8, head_size=128, block_size=128, hi_bits=4, lo_bits=2,
            n_hi=58, page_bytes=72448, compression_vs_bf16=3.62)
ROW = dict(batch=16, ctx=131072, split_kv=3, zip_ms=0.5, zip_gbps=1675.0, zip_stage_ms=0.55,
           bf16_ms=1.5, bf16_gbps=2233.0, bf16_impl="sdpa flash_attention", zip_bytes=1, bf16_bytes=1)


def test_report_passes_with_percent_of_peak():
    stages = [dict(name="tests", rc=0, seconds=100, limit=210, note="4 pytest processes")]
    tests = dict(counts=dict.fromkeys(bench.OUTCOMES, 0), seen={"t::a"}, problems=[])
    tests["counts"]["PASSED"] = 1
    text, passed = bench.render_report(_env(), stages, tests, ["t::a"], META, [ROW])
    assert passed and "**Result: PASS**" in text and "NOT a GPU result" not in text
    assert "3350 GB/s (H100 SXM, datasheet)" in text
    assert "| 16 | 131072 | 3 | 0.500 | 1675 | 50% |" in text  # 1675 of 3350 GB/s
    assert "| 3.00x |" in text  # bf16 ms / zip ms
    assert all(len(widths) == 1 for widths in _table_widths(text))


def test_report_fails_on_timeouts_errors_and_tests_not_run():
    stages = [dict(name="tests", rc=124, seconds=210, limit=210, note=""),
              dict(name="bench", rc=1, seconds=20, limit=130, note="")]
    tests = bench.parse_pytest_log(PYTEST_LOG + COLLECT_LOG)
    ids = sorted(tests["seen"]) + ["tests/kernels/test_triton_kernels.py::never_ran"]
    bad = dict(ROW, error="zip: OutOfMemoryError: CUDA out of memory | tried 8 GiB")
    text, passed = bench.render_report(_env(gpu="Some Future GPU"), stages, tests, ids, META, [ROW, bad])
    assert not passed
    for reason in ("stage tests TIMED OUT", "stage bench failed (exit 1)", "1 tests failed, 2 errors",
                   "1 collected tests did not run", "1 bench cells failed"):
        assert reason in text
    assert "unknown (GPU name not in" in text and "`tests/kernels/test_triton_kernels.py::never_ran`" in text
    assert "No module named 'yaml'" in text
    assert all(len(widths) == 1 for widths in _table_widths(text))  # the "|" in the error is escaped


def _script(tmp_path, **env):
    full = {**os.environ, "PYTHON": sys.executable, **env}
    full.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), str(tmp_path / "gpu_check.md")], capture_output=True,
                          text=True, env=full, cwd=tmp_path, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would run")
def test_script_without_gpu_fails_in_one_line(tmp_path):
    res = _script(tmp_path, CUDA_VISIBLE_DEVICES="")
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA GPU"), res.stderr
    assert "nothing run" in lines[0]
    assert list(tmp_path.iterdir()) == []  # no report, no logs


def test_script_without_python_fails_in_one_line(tmp_path):
    res = _script(tmp_path, PYTHON=str(tmp_path / "no-python"))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "no python interpreter" in res.stderr


def test_bench_refuses_to_time_the_interpreter_or_a_missing_gpu():
    assert bench.main(["--device", "cpu"]) == 2
    assert bench.main(["--device", "cuda", "--interpret"]) == 2
    if not torch.cuda.is_available():
        assert bench.main([]) == 2


def _bench_quick(jsonl: Path, *extra: str) -> subprocess.CompletedProcess:
    code = ("import sys; from zipcache_vllm.kernels.triton_loader import load; "
            "sys.exit(load('bench').main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, "--device", "cpu", "--interpret", "--quick",
                           "--jsonl", str(jsonl), *extra], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, env=dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT)))


def test_bench_quick_in_interpreter_then_report(tmp_path):
    """The benchmark's whole code path on one tiny cell (kernels in Triton's interpreter,
    SDPA on the CPU), then the report from its rows."""
    jsonl = tmp_path / "bench.jsonl"
    res = _bench_quick(jsonl)
    assert res.returncode == 0, res.stdout + res.stderr
    meta, rows = bench.read_jsonl(jsonl)
    assert meta["interpret"] and meta["page_bytes"] > 0
    assert len(rows) == 1 and "error" not in rows[0], rows
    assert rows[0]["zip_ms"] > 0 and rows[0]["bf16_ms"] > 0 and rows[0]["bf16_impl"].startswith("sdpa")
    (tmp_path / "env.json").write_text(json.dumps(_env(gpu="none (CPU self-test)", selftest=True)))
    (tmp_path / "stages.tsv").write_text("bench\t0\t5\t130\t1 rows\n")
    (tmp_path / "ids.txt").write_text("t::a\n")
    (tmp_path / "t.log").write_text("t::a PASSED [100%]\n")
    rc = bench.main(["report", "--env", str(tmp_path / "env.json"), "--stages", str(tmp_path / "stages.tsv"),
                     "--ids", str(tmp_path / "ids.txt"), "--tests-log", str(tmp_path / "t.log"),
                     "--bench-jsonl", str(jsonl), "--out", str(tmp_path / "r.md")])
    text = (tmp_path / "r.md").read_text()
    assert rc == 0, text
    assert "NOT a GPU result" in text and "numpy on the CPU" in text
    assert f"| 1 | 64 | {rows[0]['split_kv']} |" in text


def test_bench_failing_cell_is_a_row_not_a_crash(tmp_path):
    """A kernel error (here a split_kv the wrapper refuses) fails the zip half of the cell;
    the bf16 half is still measured, the row carries the error, the exit code is 1."""
    jsonl = tmp_path / "bench.jsonl"
    res = _bench_quick(jsonl, "--split-kv", "999")
    assert res.returncode == 1, res.stdout + res.stderr
    _, rows = bench.read_jsonl(jsonl)
    assert len(rows) == 1 and rows[0]["error"].startswith("zip: ValueError: split_kv must be")
    assert "zip_ms" not in rows[0] and rows[0]["bf16_ms"] > 0
    assert "ERROR zip: ValueError" in res.stdout


BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("vllm", "pydantic", "yaml"):
            raise ModuleNotFoundError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
import pytest
rc = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "tests/kernels/test_triton_kernels.py"])
from zipcache_vllm.kernels.triton_loader import load
load("bench")
sys.exit(rc)
"""


def test_triton_tests_and_bench_import_without_vllm_pydantic_yaml():
    """What a bare GPU machine (torch + triton) offers is enough: the kernel tests collect,
    the benchmark imports. (tests/step/test_triton_flow.py needs pyyaml and pydantic.)"""
    res = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True, cwd=ROOT,
                         timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 0 and "tests collected" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU run the real check instead")
def test_script_cpu_selftest_end_to_end(tmp_path):
    """Every stage of the script (preflight, collection, sharded tests with an empty shard,
    bench, report) on the CPU with one cheap test; the report says it is no GPU result."""
    res = _script(tmp_path, GPU_CHECK_CPU_SELFTEST="1", GPU_CHECK_SHARDS="2",
                  GPU_CHECK_K="test_merge_lse_identities")
    report = tmp_path / "gpu_check.md"
    assert res.returncode == 0, res.stdout + res.stderr + (report.read_text() if report.exists() else "")
    text = report.read_text()
    assert "NOT a GPU result" in text and "**Result: PASS**" in text
    assert "| 1 | 1 | 0 | 0 | 0 | 0 | 0 |" in text  # collected, passed, failed, errors, ...
    stages = (tmp_path / "gpu_check.logs" / "stages.tsv").read_text().splitlines()
    assert [s.split("\t")[0] for s in stages] == ["preflight", "collect", "tests", "bench"]
    assert "Result: PASS" in res.stdout.splitlines()[-1]
