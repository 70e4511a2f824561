"""Where the data that ships with the package lives: one lookup for every install kind.

The repository keeps three folders beside the package: ``configs/`` (KV presets, the
hardware catalog in ``configs/hardware/``, bundled model configs in ``configs/models/``),
``triton_kernels/`` (the GPU kernels) and ``csrc/`` (the C++ CPU kernels' sources).
``setup.py`` maps each of them into the package, so a wheel or a non-editable
``pip install .`` carries them as ``zipcache_vllm/configs``, ``zipcache_vllm/triton_kernels``
and ``zipcache_vllm/csrc``. An editable install or a checkout on ``PYTHONPATH`` has no such
copies and reads the repository's folders in place.

:func:`data_dir` answers for both: the copy inside the installed package when there is one,
else the folder of the checkout this package sits in. Standard library only:
``setup.py`` reaches it (through ``kernels/build.py``) before anything is installed.
"""
from __future__ import annotations

from pathlib import Path

PKG_DIR = Path(__file__).resolve().parent
DATA_DIRS = ("configs", "triton_kernels", "csrc")


def data_dir(name: str) -> Path:
    """The folder ``name`` (one of :data:`DATA_DIRS`): the installed package's copy, else the
    checkout's; when neither exists, the installed location (so errors name where it belongs)."""
    if name not in DATA_DIRS:
        raise ValueError(f"unknown data folder {name!r}; known: {', '.join(DATA_DIRS)}")
    installed, checkout = PKG_DIR / name, PKG_DIR.parent / name
    if installed.is_dir():
        return installed
    return checkout if checkout.is_dir() else installed
