"""One ``vllm serve`` process (through ``zipcache_vllm.launcher``) on loopback.

Used by the end-to-end tests (``tests/_server.py``) and by ``zipcache-vllm
reliability load``. The server runs in its own process group, so :meth:`Server.stop`
also stops its engine core and workers. With ``VLLM_SERVER_DEV_MODE=1`` and the
worker extension (:data:`WORKER_EXT`), ``POST /collective_rpc`` reads the staging
pool and per-request state of every worker (one dict per tensor-parallel rank).
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER_EXT = "zipcache_vllm.vllm_plugin.worker_ext.ZipCacheWorkerExtension"
KV_TOKENS = re.compile(r"KV cache size: ([\d,]+) tokens")
READY = re.compile(r"Application startup complete")
STARTUP_S = 900  # generous: the 2-core machine is often shared with other jobs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One ``vllm serve`` process, its log, and its port (loopback only)."""

    def __init__(self, model: str | Path, *extra: str, env: dict | None = None,
                 max_model_len: int | None = 2048, kv_space_gib: int | None = 2) -> None:
        import requests  # noqa: F401  (fail early: every helper below needs it)

        self.port = free_port()
        self.log_path = Path(tempfile.mkstemp(prefix="zipcache_serve_", suffix=".log")[1])
        # max_model_len None: vLLM's default (the model's). kv_space_gib None: no
        # VLLM_CPU_KVCACHE_SPACE at all (vLLM's CPU platform would replace
        # a --kv-cache-memory-bytes budget with it)
        base = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
        if kv_space_gib is not None:
            base["VLLM_CPU_KVCACHE_SPACE"] = str(kv_space_gib)
        env = {**base, "HF_HUB_OFFLINE": "1", "VLLM_SERVER_DEV_MODE": "1", **(env or {})}
        self.cmd = [sys.executable, "-m", "zipcache_vllm.launcher", "serve", str(model),
                    "--enforce-eager", "--host", "127.0.0.1", "--port", str(self.port),
                    *(["--max-model-len", str(max_model_len)] if max_model_len else []), *extra]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self._model_name: str | None = None

    # -- process ------------------------------------------------------------------
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: re.Pattern, timeout: float = STARTUP_S) -> re.Match:
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = pattern.search(self.log())
            if m:
                return m
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log()[-4000:]}")
            time.sleep(1)
        raise TimeoutError(f"no {pattern.pattern!r} after {timeout}s:\n{self.log()[-4000:]}")

    def wait_ready(self, timeout: float = STARTUP_S) -> None:
        self.wait_for(READY, timeout)

    def wait_exit(self, timeout: float = STARTUP_S) -> int:
        """For servers expected to refuse to start: the exit code (stops it on timeout)."""
        try:
            return self.proc.wait(timeout)
        finally:
            self.stop()

    def kv_tokens(self) -> int:
        return int(self.wait_for(KV_TOKENS).group(1).replace(",", ""))

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        if not self._log.closed:
            self._log.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- HTTP -----------------------------------------------------------------------
    def model_name(self) -> str:
        import requests

        if self._model_name is None:
            r = requests.get(f"{self.url}/v1/models", timeout=30)
            self._model_name = r.json()["data"][0]["id"]
        return self._model_name

    def chat(self, content: str, **kw) -> dict:
        import requests

        body = {"model": self.model_name(), "messages": [{"role": "user", "content": content}],
                "temperature": 0, **kw}
        r = requests.post(f"{self.url}/v1/chat/completions", json=body, timeout=600)
        return {"status": r.status_code, "json": r.json()}

    def complete(self, prompt, **kw) -> dict:
        """``/v1/completions`` (``prompt``: text or token ids), greedy unless ``kw`` says."""
        import requests

        body = {"model": self.model_name(), "prompt": prompt, "temperature": 0, **kw}
        r = requests.post(f"{self.url}/v1/completions", json=body, timeout=600)
        return {"status": r.status_code, "json": r.json()}

    def tokenize(self, text: str) -> list[int]:
        import requests

        r = requests.post(f"{self.url}/tokenize", json={"model": self.model_name(), "prompt": text,
                                                         "add_special_tokens": False}, timeout=60)
        r.raise_for_status()
        return r.json()["tokens"]

    def metric(self, name: str) -> float:
        """Sum of a Prometheus metric's samples (all label sets) from ``/metrics``."""
        import requests

        text = requests.get(f"{self.url}/metrics", timeout=30).text
        values = [float(line.rsplit(" ", 1)[-1]) for line in text.splitlines()
                  if line.startswith(name + "{") or line.startswith(name + " ")]
        if not values:
            raise KeyError(f"metric {name} not found at {self.url}/metrics")
        return sum(values)

    def rpc(self, method: str) -> list:
        """``POST /collective_rpc``: one result per worker (needs :data:`WORKER_EXT`)."""
        import requests

        r = requests.post(f"{self.url}/collective_rpc", json={"method": method}, timeout=60)
        r.raise_for_status()
        return r.json()["results"]

    def staging_stats(self) -> dict:
        return self.rpc("zipcache_staging_stats")[0]

    def request_state(self) -> list[dict]:
        """Per-worker staging and saliency bookkeeping (see ``worker_ext.py``)."""
        return self.rpc("zipcache_request_state")

    def wait_idle(self, timeout: float = 120) -> list[dict]:
        """Wait until no request runs or waits and every worker holds no request state."""
        deadline = time.time() + timeout
        while True:
            busy = self.metric("vllm:num_requests_running") + self.metric("vllm:num_requests_waiting")
            state = self.request_state()
            if not busy and not any(leaked(s) for s in state):
                return state
            if time.time() > deadline:
                return state
            time.sleep(1)


def leaked(state: dict) -> int:
    """Units of per-request state a worker still holds (0 when nothing is left behind)."""
    return (state["in_use"] + state["keyed_blocks"] + state["staged_tokens"]
            + state["saliency_tokens"] + state["preempted_pending"])
