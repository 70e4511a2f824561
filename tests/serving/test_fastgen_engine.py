"""Paged FastGen through the real vLLM engine (slow: two engine runs, float32).

* capacity: the engine's own "KV cache size: N tokens" equals the layout's
  prediction, and grows over the same storage without eviction by ~B / S;
* fidelity: engine logprobs equal the offline simulator of the same preset
  (the code behind the quality table), with the same tolerance argument as
  tests/serving/test_engine_fidelity.py;
* greedy output is sane (the chat prompt's answer names Paris).
"""
import inspect
import os
from pathlib import Path

import pytest

from zipcache_vllm.fastgen import engine_check

DTYPES = ("zipcache_fastgen_t95", "zipcache_fastgen")
# Same justification as tests/serving/test_engine_fidelity.py: float32 summation order moves
# logprobs by ~1e-5..1e-4; a near-tie in a block's ranking can flip one kept token,
# which moves later logprobs by up to the size of the compression effect itself.
MEDIAN_TOL = 1e-3
MEAN_FRACTION = 0.2


def test_runner_fills_token_ids_before_building_metadata():
    """The premise of compat.patch_step_token_ids (fast; reads vLLM's source)."""
    pytest.importorskip("vllm")
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert list(inspect.signature(GPUModelRunner._prepare_inputs).parameters)[:2] == [
        "self", "scheduler_output"]
    assert "out=self.input_ids.cpu[:total_num_scheduled_tokens]" in inspect.getsource(
        GPUModelRunner._prepare_inputs)
    src = inspect.getsource(GPUModelRunner.execute_model)
    assert 0 <= src.index("self._prepare_inputs(") < src.index("self._build_attention_metadata(")


@pytest.fixture(scope="module")
def results(model_dir):
    res = {d: engine_check.check(str(model_dir), d, num_prompts=2, prompt_len=600, max_tokens=24)
           for d in DTYPES}
    out = os.environ.get("ZIPCACHE_FASTGEN_ENGINE_MD")  # docs/results/fastgen_engine.md
    if out:
        from zipcache_vllm.eval.offline import machine_line

        cmd = f"ZIPCACHE_FASTGEN_ENGINE_MD={out} pytest -m slow tests/serving/test_fastgen_engine.py"
        Path(out).write_text(engine_check.markdown(list(res.values()), cmd, machine_line()))
    return res


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.parametrize("dtype", DTYPES)
def test_capacity_from_engine_log_grows_by_kept_fraction(results, dtype):
    r = results[dtype]
    cap = r["capacity"]
    print(dtype, r["kv_tokens_logged"], cap)
    assert r["kv_tokens_logged"] == cap["tokens"]
    # the pages grow by B / S; the logged tokens a little less, because the smaller pages
    # need more staging blocks per request (docs/BACKEND.md#staging)
    growth = cap["page_bytes_no_eviction"] / cap["page_bytes"]
    assert growth == pytest.approx(cap["block_size"] / cap["slots"], rel=0.02)
    assert 1 < r["kv_tokens_logged"] / cap["tokens_no_eviction"] <= growth


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.parametrize("dtype", DTYPES)
def test_engine_logprobs_match_the_offline_simulator(results, dtype):
    r = results[dtype]
    print(dtype, r["vs_same_preset"], r["vs_uncompressed"])
    assert r["tokens"] == 3 * 24
    assert r["vs_same_preset"]["median"] < MEDIAN_TOL
    assert r["vs_same_preset"]["mean"] < MEAN_FRACTION * r["vs_uncompressed"]["mean"]


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.parametrize("dtype", DTYPES)
def test_greedy_chat_answer_is_sane(results, dtype):
    assert "Paris" in results[dtype]["chat_answer"]
