"""Build and load the C++ CPU kernels (``csrc/``).

Preferred: the extension ``setup.py`` compiled at install time against the installed
torch (``zipcache_vllm/_C*.so`` with its ``_C.buildkey``, in a checkout or in a wheel),
loaded when its key (:func:`build_key`: sources, flags, torch version) equals the
current one. The sources ship with the package (``csrc/`` in a checkout,
``zipcache_vllm/csrc`` in a wheel: :func:`zipcache_vllm.resources.data_dir`).

Fallback, when no current install-time extension exists (pip's isolated build has no
torch, so it builds none): compile on first use with ``torch.utils.cpp_extension.load``
against the torch that is *running*, into ``~/.cache/zipcache_vllm/ext/<key>/`` where
``key`` also hashes the compiler, so a changed source or an upgraded torch rebuilds and
anything else reuses the cached ``.so``; this logs a warning first (the first request
waits for the compile, :data:`JIT_COMPILE_COST`). ``ZIPCACHE_VLLM_EXT_DIR`` overrides the
cache root; ``ZIPCACHE_VLLM_EXT=jit`` forces this path.

No ``-march=native``: the AVX2 and AVX-512 kernels are separate translation
units compiled with ``#pragma GCC target`` and picked at run time by CPUID, so
a cached build also runs on an older CPU (it then takes the portable path).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

from ..resources import data_dir

CSRC = data_dir("csrc")
PKG_DIR = Path(__file__).resolve().parents[1]
INSTALLED_KEY = PKG_DIR / "_C.buildkey"  # written by setup.py next to the extension it built
# Compiling all sources once, measured on the 2-core CI machine: 78 s of CPU time, 3 min 10 s
# of wall time while other jobs loaded it (ZIPCACHE_VLLM_EXT=jit, empty ZIPCACHE_VLLM_EXT_DIR).
JIT_COMPILE_COST = "about 80 s of CPU time, 1-3 minutes on 2 cores"
SOURCES = ("ops.cpp", "decode.cpp", "rotate.cpp", "rotate_avx512.cpp", "dequant.cpp", "attend_scalar.cpp", "attend_avx2.cpp", "attend_avx512.cpp")
HEADERS = ("zc_kernels.h", "host.h", "attend_impl.h", "uniform.h")
CFLAGS = ("-O3", "-fopenmp", "-Wno-psabi", "-fno-math-errno")  # cpp_extension adds -std=c++20
LDFLAGS = ("-fopenmp",)

_lock = threading.Lock()
_loaded: str | None = None  # library path once loaded in this process
logger = logging.getLogger(__name__)


class KernelBuildError(RuntimeError):
    """The C++ extension could not be compiled or loaded."""


def cache_root() -> Path:
    root = os.environ.get("ZIPCACHE_VLLM_EXT_DIR")
    return Path(root) if root else Path.home() / ".cache" / "zipcache_vllm" / "ext"


def build_key() -> str:
    """Hash of sources, flags and torch version: what an extension must match to be loaded.

    ``setup.py`` records it next to the extension it builds (``_C.buildkey``); the compiler
    is not part of it, so a runtime without one still loads the install-time extension."""
    import torch

    missing = [n for n in SOURCES + HEADERS if not (CSRC / n).is_file()]
    if missing:
        raise KernelBuildError(f"C++ sources not found in {CSRC}: {missing}")
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    h.update(torch.__version__.encode())
    return h.hexdigest()[:16]


def jit_key() -> str:
    """:func:`build_key` plus the compiler: the compile-on-first-use cache directory name."""
    h = hashlib.sha256(build_key().encode())
    h.update(str(shutil.which(os.environ.get("CXX", "c++"))).encode())
    return h.hexdigest()[:16]


def installed_extension() -> Path | None:
    """The extension ``setup.py`` built at install time (``zipcache_vllm/_C<suffix>`` for
    this interpreter), if its recorded build key equals the current sources' (else it is
    stale: compile instead)."""
    if os.environ.get("ZIPCACHE_VLLM_EXT", "") == "jit":
        return None
    libs = [PKG_DIR / f"_C{suffix}" for suffix in EXTENSION_SUFFIXES if (PKG_DIR / f"_C{suffix}").is_file()]
    if not libs or not INSTALLED_KEY.is_file() or INSTALLED_KEY.read_text().strip() != build_key():
        return None
    return libs[0]


def load(verbose: bool = False) -> str:
    """Compile (if needed) and load the extension; returns the library path.

    Raises :class:`KernelBuildError` with the compiler's message on failure.
    Safe to call repeatedly and from several threads; concurrent processes are
    serialized by cpp_extension's lock file in the build directory.
    """
    global _loaded
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        import torch
        from torch.utils import cpp_extension

        prebuilt = installed_extension()
        if prebuilt is not None:
            torch.ops.load_library(str(prebuilt))
            _loaded = str(prebuilt)
            return _loaded

        key = jit_key()
        build_dir = cache_root() / key
        build_dir.mkdir(parents=True, exist_ok=True)
        if not any(build_dir.glob("*.so")):
            logger.warning(
                "zipcache C++ kernels: no current install-time build (pip's isolated build has no "
                "torch; install with `pip install --no-build-isolation`), compiling them now, once, "
                "into %s (%s; later starts reuse it)", build_dir, JIT_COMPILE_COST)
        try:
            path = cpp_extension.load(
                name=f"zipcache_cpu_{key}",
                sources=[str(CSRC / n) for n in SOURCES],
                extra_cflags=list(CFLAGS),
                extra_ldflags=list(LDFLAGS),
                extra_include_paths=[str(CSRC)],
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=verbose,
            )
        except Exception as exc:  # compiler missing, compile error, load error
            raise KernelBuildError(f"building the zipcache C++ kernels in {build_dir} failed: {exc}") from exc
        if not hasattr(torch.ops.zipcache, "attend_packed"):
            raise KernelBuildError("extension loaded but torch.ops.zipcache.attend_packed is missing")
        _loaded = str(path) if path else str(build_dir)
        return _loaded
