"""Build and load the C++ CPU kernels (``csrc/``) on first use.

The extension is compiled with ``torch.utils.cpp_extension.load`` against the
torch that is *running* (pip's isolated build would pick another torch, see the
shared VLLM notes), into ``~/.cache/zipcache_vllm/ext/<key>/`` where ``key``
hashes the sources, the compile flags, the torch version and the compiler, so a
changed source or an upgraded torch rebuilds and anything else reuses the
cached ``.so``. ``ZIPCACHE_VLLM_EXT_DIR`` overrides the cache root.

Preferred: the extension ``setup.py`` compiled at install time
(``zipcache_vllm/_C*.so`` with its ``_C.buildkey``), loaded when its key equals the
current one; ``ZIPCACHE_VLLM_EXT=jit`` forces the compile-on-first-use path.

No ``-march=native``: the AVX2 and AVX-512 kernels are separate translation
units compiled with ``#pragma GCC target`` and picked at run time by CPUID, so
a cached build also runs on an older CPU (it then takes the portable path).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path

CSRC = Path(__file__).resolve().parents[2] / "csrc"
PKG_DIR = Path(__file__).resolve().parents[1]
INSTALLED_KEY = PKG_DIR / "_C.buildkey"  # written by setup.py next to the extension it built
SOURCES = ("ops.cpp", "decode.cpp", "rotate.cpp", "rotate_avx512.cpp", "dequant.cpp", "attend_scalar.cpp", "attend_avx2.cpp", "attend_avx512.cpp")
HEADERS = ("zc_kernels.h", "host.h", "attend_impl.h")
CFLAGS = ("-O3", "-fopenmp", "-Wno-psabi", "-fno-math-errno")  # cpp_extension adds -std=c++20
LDFLAGS = ("-fopenmp",)

_lock = threading.Lock()
_loaded: str | None = None  # library path once loaded in this process


class KernelBuildError(RuntimeError):
    """The C++ extension could not be compiled or loaded."""


def cache_root() -> Path:
    root = os.environ.get("ZIPCACHE_VLLM_EXT_DIR")
    return Path(root) if root else Path.home() / ".cache" / "zipcache_vllm" / "ext"


def build_key() -> str:
    """Hash of sources, flags, torch version and compiler: the cache directory name."""
    import torch

    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    h.update(torch.__version__.encode())
    h.update(str(shutil.which(os.environ.get("CXX", "c++"))).encode())
    return h.hexdigest()[:16]


def installed_extension() -> Path | None:
    """The extension ``setup.py`` built at install time (``zipcache_vllm/_C*.so``), if its
    recorded build key equals the current sources' (else it is stale: compile instead)."""
    if os.environ.get("ZIPCACHE_VLLM_EXT", "") == "jit":
        return None
    libs = sorted(PKG_DIR.glob("_C*.so"))
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

        missing = [n for n in SOURCES + HEADERS if not (CSRC / n).is_file()]
        if missing:
            raise KernelBuildError(f"C++ sources not found in {CSRC}: {missing}")
        key = build_key()
        build_dir = cache_root() / key
        build_dir.mkdir(parents=True, exist_ok=True)
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
