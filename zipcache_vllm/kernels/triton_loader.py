"""Import the repository's Triton kernels (``triton_kernels/``) under a private name.

The folder is not a regular package (vLLM imports an unrelated installed
``triton_kernels``, which would win over a namespace folder on ``sys.path``), so
code that must reach *our* kernels wherever it runs from loads them by path as
the package ``zipcache_triton``: ``load("ops")`` is ``triton_kernels/ops.py``.
Needs torch and triton only (no vLLM).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

TRITON_DIR = Path(__file__).resolve().parents[2] / "triton_kernels"
PACKAGE = "zipcache_triton"


def load(module: str = "ops"):
    """``triton_kernels/<module>.py`` as ``zipcache_triton.<module>`` (imported once)."""
    if PACKAGE not in sys.modules:
        if not (TRITON_DIR / "ops.py").is_file():
            raise ImportError(f"zipcache Triton kernels not found in {TRITON_DIR} (install the "
                              "repository editable: pip install -e .)")
        spec = importlib.util.spec_from_loader(PACKAGE, loader=None, is_package=True)
        pkg = importlib.util.module_from_spec(spec)
        pkg.__path__ = [str(TRITON_DIR)]
        sys.modules[PACKAGE] = pkg
    return importlib.import_module(f"{PACKAGE}.{module}")
