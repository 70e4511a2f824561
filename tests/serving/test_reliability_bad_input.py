"""Bad input at startup: a clear error naming the problem and the fix, nothing half-started.

Each case runs the real ``vllm serve`` (through our launcher) and asserts that it
exits non-zero with the message, that no process of its group is left, and that
nothing listens on its port. Already proven in test_engine_e2e.py and not repeated:
an unknown preset (``invalid choice`` listing the valid dtypes) and a ``--block-size``
other than the preset's. Custom presets: a user points ``ZIPCACHE_VLLM_CONFIG_DIR``
at a folder of preset YAML files, added to the built-ins (a copy of a built-in file is
accepted, which these tests use); every file there is loaded when the plugin
registers, so a broken file stops every vLLM command at once.
The platform check (zipcache dtypes on a non-CPU platform) cannot be reached on this
machine by a real engine; it is driven through the patched selector instead.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
from _server import Server

from zipcache_vllm.config import CONFIG_DIR

EXIT_S = 600
GROUP_GONE_S = 60  # engine core and workers finish their own teardown after the API server


def _live_group_members(pgid: int) -> list[str]:
    """Processes of group ``pgid`` that are not zombies (a container's PID 1 may never
    reap orphans), as "pid state command" lines."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        head, _, rest = text.rpartition(")")
        fields = rest.split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(f"{stat.parent.name} {fields[0]} {head.partition('(')[2]}")
    return members


def _refused(server: Server, *needles: str) -> str:
    """The server must exit non-zero, leave no process and no port, and log ``needles``."""
    code = server.wait_exit(EXIT_S)
    log = server.log()
    assert code != 0, log[-3000:]
    for n in needles:
        assert n in log, f"{n!r} not in the log:\n{log[-3000:]}"
    assert "Application startup complete" not in log
    deadline = time.time() + GROUP_GONE_S
    while (left := _live_group_members(server.proc.pid)) and time.time() < deadline:
        time.sleep(1)
    assert not left, f"still running {GROUP_GONE_S} s after the server exited: {left}"
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", server.port)) != 0
    return log


def _config_dir(tmp_path, name: str, text: str):
    d = tmp_path / "presets"
    shutil.copytree(CONFIG_DIR, d)
    (d / f"{name}.yaml").write_text(text)
    return d



@pytest.mark.slow
@pytest.mark.engine
def test_malformed_custom_preset_yaml(model_dir, tmp_path):
    d = _config_dir(tmp_path, "mine", "name: mine\nmethod: zipcache\nhi_bits: [4\n")
    s = Server(model_dir, "--kv-cache-dtype", "zipcache_mine",
               env={"ZIPCACHE_VLLM_CONFIG_DIR": str(d)})
    _refused(s, "mine.yaml: malformed YAML", "ZIPCACHE_VLLM_CONFIG_DIR")


@pytest.mark.slow
@pytest.mark.engine
def test_out_of_range_bits_and_ratio_in_custom_preset(model_dir, tmp_path):
    d = _config_dir(tmp_path, "mine", "name: mine\nmethod: zipcache\nhi_bits: 5\n"
                                      "salient_ratio: 1.5\n")
    s = Server(model_dir, "--kv-cache-dtype", "zipcache_mine",
               env={"ZIPCACHE_VLLM_CONFIG_DIR": str(d)})
    _refused(s, "invalid preset", "mine.yaml", "hi_bits", "salient_ratio",
             "less than or equal to 1")


@pytest.mark.slow
@pytest.mark.engine
def test_sliding_window_shorter_than_a_page_is_refused(model_dir, tmp_path):
    """A model feature the preset cannot serve, refused at startup with the fix: the same
    weights with a sliding window (100 tokens) shorter than zipcache's 128-token pages
    (sliding windows longer than a page are served: Gemma 3, tests/serving/test_gemma3.py)."""
    d = tmp_path / "swa_model"
    d.mkdir()
    for f in os.listdir(model_dir):
        if f != "config.json":
            os.symlink(os.path.join(model_dir, f), d / f)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["sliding_window"] = 100
    (d / "config.json").write_text(json.dumps(cfg))
    s = Server(d, "--kv-cache-dtype", "zipcache")
    _refused(s, "sliding window (100 tokens)", "smaller pages", "--kv-cache-dtype auto")


@pytest.mark.slow
@pytest.mark.engine
def test_skip_layers_is_refused(model_dir):
    s = Server(model_dir, "--kv-cache-dtype", "zipcache", "--kv-cache-dtype-skip-layers", "0")
    _refused(s, "does not support --kv-cache-dtype-skip-layers")


@pytest.mark.slow
@pytest.mark.engine
def test_a_request_that_cannot_fit_its_staging_is_refused(model_dir):
    """A budget of 65 pages (SmolLM2, ``zipcache``: 30 layers x 21,360 bytes each): one
    request of 8,192 tokens needs 64 pages and 2 staging blocks, so
    vLLM's own startup check refuses it (without the staging blocks it would fit), with the
    longest length that fits. Fails in the engine process (after the workers start): the API
    server must still exit and take every engine and worker process with it."""
    s = Server(model_dir, "--kv-cache-dtype", "zipcache", "--kv-cache-memory-bytes",
               str(65 * 30 * 21_360), max_model_len=8192, kv_space_gib=None)
    _refused(s, "max seq len (8192)", "estimated maximum model length is")


def test_non_cpu_platform_is_refused(monkeypatch):
    """The kv dtype/platform mismatch: on a platform without zipcache kernels the
    backend selection fails with the platform's name instead of falling back."""
    from types import SimpleNamespace

    from zipcache_vllm.vllm_plugin import plugin

    plugin.register()
    from vllm.platforms import current_platform

    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self=None: False)
    cfg = SimpleNamespace(kv_cache_dtype="zipcache")
    with pytest.raises(NotImplementedError, match="runs on CPU .* and NVIDIA CUDA"):
        type(current_platform).get_attn_backend_cls(None, cfg)
