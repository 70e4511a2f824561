"""Import the repository's Triton kernels (``triton_kernels/``) under a private name.

The folder is not a regular package (vLLM imports an unrelated installed
``triton_kernels``, which would win over a namespace folder on ``sys.path``), so
code that must reach *our* kernels wherever it runs from loads them by path as
the package ``zipcache_triton``: ``load("ops")`` is ``triton_kernels/ops.py``.
The folder is the checkout's or, in a wheel install, the package's copy
``zipcache_vllm/triton_kernels`` (:func:`zipcache_vllm.resources.data_dir`).
Needs torch and triton only (no vLLM).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

from ..resources import data_dir

TRITON_DIR = data_dir("triton_kernels")
PACKAGE = "zipcache_triton"


def load(module: str = "ops"):
    """``triton_kernels/<module>.py`` as ``zipcache_triton.<module>`` (imported once)."""
    if PACKAGE not in sys.modules:
        if not (TRITON_DIR / "ops.py").is_file():
            raise ImportError(f"zipcache Triton kernels not found in {TRITON_DIR}: this install lacks "
                              "its package data; reinstall zipcache_vllm (wheel, pip install . or -e .)")
        spec = importlib.util.spec_from_loader(PACKAGE, loader=None, is_package=True)
        pkg = importlib.util.module_from_spec(spec)
        pkg.__path__ = [str(TRITON_DIR)]
        sys.modules[PACKAGE] = pkg
    return importlib.import_module(f"{PACKAGE}.{module}")
