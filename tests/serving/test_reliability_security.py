"""The plugin opens no ports and reads no files beyond its presets (and its kernel build).

Two checks over the code vLLM loads into its processes (``vllm_plugin/``, ``kernels/``,
``quant/``, ``saliency/``, ``fastgen/`` engine parts, ``config.py``, ``layout.py``):

* static: no networking module is imported and no file is opened, except
  ``config.py`` (the preset YAML files) and ``kernels/build.py`` (hashing the C++
  sources in ``csrc/`` and the compiled-extension cache);
* at run time, under a Python audit hook (PEP 578) in a fresh interpreter: the plugin
  registers into vLLM, serves a step of two requests through the kernels and answers
  the worker-extension RPCs, and every ``open`` and ``socket.*`` event raised with
  plugin code as the nearest non-library caller is recorded: no socket, and files only
  under ``configs/``, ``csrc/`` and the extension cache.

The HTTP stats endpoints that another part adds to vLLM's own server
(``vllm_plugin/endpoints.py``: routes on vLLM's port, no port of their own) and their
``--api-key`` handling are tested with that feature, not here.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import zipcache_vllm

PKG = Path(zipcache_vllm.__file__).resolve().parent
LOADED_BY_VLLM = ["vllm_plugin", "engine", "kernels", "quant", "saliency", "policies", "config.py", "dtypes.py",
                  "layout.py", "resources.py"]
NETWORK_MODULES = {"socket", "socketserver", "http", "urllib", "requests", "aiohttp", "uvicorn",
                   "httpx", "websockets", "zmq", "ssl", "ftplib", "smtplib", "xmlrpc"}
FILE_CALLS = {"open", "read_text", "read_bytes", "write_text", "write_bytes", "fdopen"}
MAY_TOUCH_FILES = {"config.py", "kernels/build.py"}


def _sources() -> list[Path]:
    out = []
    for part in LOADED_BY_VLLM:
        p = PKG / part
        out += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return out


def test_static_no_network_imports_and_file_access_only_where_allowed():
    network, files = [], []
    for path in _sources():
        rel = path.relative_to(PKG).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                names = []
            network += [f"{rel}:{node.lineno} imports {n}" for n in names
                        if n.split(".")[0] in NETWORK_MODULES]
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                if name in FILE_CALLS and rel not in MAY_TOUCH_FILES:
                    files.append(f"{rel}:{node.lineno} calls {name}")
                if name in {"bind", "listen", "start_server", "create_server"}:
                    network.append(f"{rel}:{node.lineno} calls {name}")
    assert len(_sources()) > 10
    assert not network, network
    assert not files, files


_MONITOR = r'''
import json, os, sys, sysconfig
from pathlib import Path
PKG = sys.argv[1]
LIBS = tuple({sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"],
              sysconfig.get_paths()["platlib"]})
EXCLUDE = (os.path.join(PKG, "reliability"),)
events = []

def nearest_caller(frame):
    """File of the nearest frame that is not the standard library or an installed package."""
    while frame is not None:
        f = frame.f_code.co_filename
        if f.startswith("<frozen importlib"):
            return f  # module-level code of a library being imported: the library's doing
        if not (f.startswith(LIBS) or f.startswith("<")):
            return f
        frame = frame.f_back
    return ""

def hook(event, args):
    if event == "open" or event.startswith("socket."):
        caller = nearest_caller(sys._getframe(1))
        if caller.startswith(PKG) and not caller.startswith(EXCLUDE):
            target = args[0] if args else None
            if event == "open" and isinstance(target, int):
                return  # an already open descriptor (its path was seen when it was opened)
            if event == "open" and isinstance(target, (str, bytes, os.PathLike)):
                target = os.fsdecode(target)
                if (target.endswith((".py", ".pyc", ".so", ".zip")) or ".dist-info" in target
                        or target in sys.path):
                    return  # the import system loading modules
            events.append([event, str(target)[:300], caller, sys._getframe(1).f_lineno])

sys.addaudithook(hook)

import torch
from zipcache_vllm.engine import staging
from zipcache_vllm.vllm_plugin import plugin, worker_ext
from zipcache_vllm.dtypes import cache_dtypes
plugin.register()
cache_dtypes()
from zipcache_vllm.config import load_preset
from zipcache_vllm.layout import BlockLayout
from zipcache_vllm.engine.plan import plan_step
from zipcache_vllm.policies import make_policy
from zipcache_vllm.engine.step import apply_step
preset = load_preset("zipcache")
H, G, D = 3, 3, 64
layout = BlockLayout.from_preset(preset, D, H)
B = layout.block_size
policy = make_policy(preset)
pool = staging.StagingPool(["l0"], 3, B, H, D, torch.bfloat16, blocks=policy.staged_blocks)
pages = torch.zeros(6, layout.page_bytes, dtype=torch.uint8)
table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
plans = plan_step(pool, B, [0, 200, 330], [200, 130], table)
q = torch.randn(330, H * G, D).bfloat16()
k = torch.randn(330, H, D).bfloat16()
apply_step(pool, 0, plans, q, k, k.clone(), pages, layout, policy, D ** -0.5, torch.zeros(330, H * G, D))
plans = plan_step(pool, B, [0, 1, 2], [201, 131], table)
apply_step(pool, 0, plans, q[:2], k[:2], k[:2].clone(), pages, layout, policy, D ** -0.5, torch.zeros(2, H * G, D))
from types import SimpleNamespace
from zipcache_vllm.vllm_plugin import backend
impl = backend.ZipCacheImpl(H * G, D, D ** -0.5, H, None, None, "zipcache")
impl.attach(backend.ZipCacheEngine(pool), 0)  # what the engine's metadata builder does
ext = worker_ext.ZipCacheWorkerExtension()
ext.vllm_config = SimpleNamespace(compilation_config=SimpleNamespace(
    static_forward_context={"l0": SimpleNamespace(impl=impl)}))
ext.zipcache_staging_stats(); ext.zipcache_request_state()
print("EVENTS " + json.dumps(events))
'''


@pytest.mark.slow  # imports vLLM in a fresh interpreter: about 30 s
def test_runtime_no_sockets_and_no_files_beyond_presets_and_kernel_cache(tmp_path):
    from zipcache_vllm.config import CONFIG_DIR
    from zipcache_vllm.kernels import build

    script = tmp_path / "monitor.py"
    script.write_text(_MONITOR)
    proc = subprocess.run([sys.executable, str(script), str(PKG)], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("EVENTS "))
    events = json.loads(line[len("EVENTS "):])
    # Presets, the C++ sources and the kernel cache, plus the install-time extension's
    # build key (read to check the prebuilt ``_C*.so`` matches the sources).
    allowed = (str(Path(CONFIG_DIR).resolve()), str(build.CSRC.resolve()),
               str(build.cache_root().resolve()), str(build.INSTALLED_KEY))
    sockets = [e for e in events if e[0].startswith("socket.")]
    reads = [e for e in events if e[0] == "open"]
    print(f"\n{len(reads)} file opens by plugin code, {len(sockets)} socket events")
    assert not sockets, sockets
    outside = [e for e in reads if not str(Path(e[1]).resolve()).startswith(allowed)]
    assert not outside, outside
    assert any(e[1].endswith("zipcache.yaml") for e in reads)  # the monitor does see reads
