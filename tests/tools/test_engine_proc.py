"""The tools' worker processes (``zipcache_vllm/engine_proc.py``) without an engine: output
to the log, progress from it, the environment given, and a failure with the log's tail.
(A worker past its time: tests/tools/test_bench_decode.py.)"""
from __future__ import annotations

import os

import pytest

from zipcache_vllm import engine_proc


def test_output_reaches_the_log_and_the_progress_callback(tmp_path):
    seen = []
    text = engine_proc.run_worker("platform", [], tmp_path / "w.log", "platform worker", timeout=60,
                                  progress=seen.append)
    assert text.strip() and text == (tmp_path / "w.log").read_text()
    assert seen and seen[-1] == text


def test_a_failing_worker_raises_with_its_log(tmp_path):
    with pytest.raises(engine_proc.WorkerFailed, match=r"no worker failed \(exit 1\)") as exc:
        engine_proc.run_worker("zipcache_no_such_module", [], tmp_path / "w.log", "no worker", timeout=60)
    assert "No module named zipcache_no_such_module" in exc.value.log


def test_environment_set_and_dropped(tmp_path, monkeypatch):
    """The worker sees ``env`` on top of this process's environment, without ``drop_env``,
    and always offline (no hub download from a worker)."""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    script = tmp_path / "show_env.py"
    script.write_text("import os\nfor k in ('VLLM_CPU_KVCACHE_SPACE', 'HF_HUB_OFFLINE', 'ZC_TEST'):\n"
                      "    print(k, os.environ.get(k))\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    text = engine_proc.run_worker("show_env", [], tmp_path / "w.log", "env worker", timeout=60,
                                  env={"ZC_TEST": "1"}, drop_env=("VLLM_CPU_KVCACHE_SPACE",))
    assert text.split("\n")[:3] == ["VLLM_CPU_KVCACHE_SPACE None", "HF_HUB_OFFLINE 1", "ZC_TEST 1"]
