"""Engine fidelity: does the served engine store and read what the reference says?

Two measurements over the same prompts (real text, >= 512-token contexts):

1. **Engine vs offline reference.** The engine runs in float32 with a zipcache
   dtype and returns greedy tokens with their logprobs. The offline simulator
   (``simulate.py``, the code behind the quality table) replays the same tokens
   with the same preset (prompt as one chunk, then block-by-block decode) and
   gives its logprobs. Equal storage (same pages, same saliency) gives equal
   logprobs up to float32 summation order; the same comparison against the
   simulator with no compression shows how large the quantization effect is
   that this agreement resolves.
2. **Greedy agreement with bf16.** In the serving dtype (bfloat16) the engine
   generates greedily with ``auto``, ``fp8``, ``zipcache`` and
   ``zipcache_random_mixed``; reported per dtype: the mean fraction of each
   generation that matches ``auto`` before the first divergence.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from ..engine_proc import REFUSAL, WorkerFailed, run_worker
from ..policies import make_policy
from .simulate import KVSimulator, SimConfig

GREEDY_DTYPES = ("auto", "fp8", "zipcache", "zipcache_random_mixed")
#: Relative size of the noise on q/k/v for the rounding floor (``sim_vs_rounding_noise``):
#: vLLM's and HF's layer-0 inputs differ by 7e-7 to 1e-6 of their max |value| on both
#: bundled models (``test_engine_inputs_differ_from_hf_only_after_rope``).
ROUNDING_NOISE = 1e-6


def engine_generate(model_dir: str, kv_dtype: str, prompts: list[list[int]], workdir: Path,
                    dtype: str = "bfloat16", max_tokens: int = 64, timeout: float = 1800) -> dict:
    """Run ``engine_gen`` in its own process; returns its JSON result."""
    pfile = workdir / "prompts.json"
    pfile.write_text(json.dumps(prompts))
    out = workdir / f"gen_{kv_dtype}_{dtype}.json"
    args = ["--model", model_dir, "--kv-cache-dtype", kv_dtype, "--dtype", dtype, "--prompts", str(pfile),
            "--out", str(out), "--max-tokens", str(max_tokens)]
    try:
        run_worker("zipcache_vllm.eval.engine_gen", args, workdir / f"gen_{kv_dtype}_{dtype}.log",
                   f"engine run {kv_dtype}/{dtype}", timeout)
    except WorkerFailed as exc:
        unsupported = REFUSAL.search(exc.log)
        if unsupported:  # vLLM's own fp8 CPU path needs AVX-512 or AMX
            return {"unsupported": unsupported.group(1)}
        raise
    return json.loads(out.read_text())


def preset_of(kv_dtype: str) -> str:
    from ..dtypes import preset_for_dtype

    return preset_for_dtype(kv_dtype).name


@torch.inference_mode()
def simulated_logprobs(model, preset: str, prompt: list[int], gen: list[int],
                       input_noise: float = 0.0) -> list[float]:
    """Logprob of each generated token under the simulated cache of ``preset``
    (``input_noise``: :attr:`SimConfig.input_noise`)."""
    from .offline import simulated_logprobs

    policy = make_policy(preset)
    # Block-aligned chunks from position 0: what the engine computes for any chunking
    # (each query sees earlier blocks packed, its own block in full precision).
    sim = KVSimulator(policy, SimConfig(prefill_len=0, chunk_size=policy.preset.block_size,
                                        input_noise=input_noise))
    ids = torch.tensor(prompt + gen)
    lp = simulated_logprobs(model, sim, ids, len(prompt) - 1)
    return lp.gather(-1, torch.tensor(gen).unsqueeze(-1)).squeeze(-1).tolist()


def gap_stats(gaps: list[float]) -> dict:
    """Mean, median, p99 and max of per-token |logprob| gaps."""
    t = torch.tensor(gaps)
    return {"mean": float(t.mean()), "median": float(t.median()), "p99": float(t.quantile(0.99)),
            "max": float(t.max())}


def prefix_match(a: list[int], b: list[int]) -> float:
    """Fraction of ``a`` that equals ``b`` before the first divergence."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n / max(len(a), 1)


def run(model_dir: str, num_prompts: int = 20, prompt_len: int = 600, max_tokens: int = 64,
        kv_dtype: str = "zipcache", progress: bool = True, greedy_dtypes: tuple[str, ...] = GREEDY_DTYPES) -> dict:
    """The engine-vs-reference comparison, then greedy agreement with ``auto`` for
    ``greedy_dtypes`` (empty: skipped, and ``auto`` is not run; needs ``auto`` otherwise)."""
    if greedy_dtypes and "auto" not in greedy_dtypes:
        raise ValueError(f"greedy agreement is measured against auto: add it to {greedy_dtypes}")
    from tqdm.auto import tqdm

    from .offline import load_model, token_windows_for

    model, tok = load_model(model_dir)
    prompts = token_windows_for(tok, prompt_len, num_prompts)
    result: dict = {"num_prompts": num_prompts, "prompt_len": prompt_len, "max_tokens": max_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        steps = [("fidelity", kv_dtype, "float32")] + [("greedy", d, "bfloat16") for d in greedy_dtypes]
        gens = {}
        for kind, d, dt in tqdm(steps, desc="engine runs", disable=not progress):
            gens[(d, dt)] = engine_generate(model_dir, d, prompts, work, dt, max_tokens)
    fid = gens[(kv_dtype, "float32")]
    preset = preset_of(kv_dtype)
    diffs_same, diffs_none, diffs_sim, diffs_noise = [], [], [], []
    for prompt, row in tqdm(list(zip(prompts, fid["rows"])), desc="simulating", disable=not progress):
        gen, elp = row["token_ids"], row["logprobs"]
        same = simulated_logprobs(model, preset, prompt, gen)
        none = simulated_logprobs(model, "none", prompt, gen)
        noisy = simulated_logprobs(model, preset, prompt, gen, input_noise=ROUNDING_NOISE)
        diffs_same += [abs(a - b) for a, b in zip(elp, same)]
        diffs_none += [abs(a - b) for a, b in zip(elp, none)]
        diffs_sim += [abs(a - b) for a, b in zip(same, none)]
        diffs_noise += [abs(a - b) for a, b in zip(same, noisy)]
    result["fidelity"] = {
        "kv_cache_dtype": kv_dtype, "preset": preset, "tokens": len(diffs_same),
        "vs_same_preset": gap_stats(diffs_same), "vs_uncompressed": gap_stats(diffs_none),
        # the quantization effect in the simulation, which the engine's must match in size
        "sim_vs_uncompressed": gap_stats(diffs_sim),
        # the simulation against itself with its attention inputs moved by float32 rounding:
        # how far any implementation of the preset fed those inputs can sit from it
        "sim_vs_rounding_noise": gap_stats(diffs_noise),
    }
    greedy = {}
    for d in greedy_dtypes:
        ref = gens[("auto", "bfloat16")]
        g = gens[(d, "bfloat16")]
        if "unsupported" in g:
            greedy[d] = {"unsupported": g["unsupported"]}
            continue
        fr = [prefix_match(r["token_ids"], a["token_ids"]) for r, a in zip(g["rows"], ref["rows"])]
        greedy[d] = {"mean_prefix_match": sum(fr) / len(fr), "kv_tokens": g["num_gpu_blocks"] * g["block_size"]}
    result["greedy"] = greedy
    return result


def _stats_row(label: str, st: dict) -> str:
    return f"| {label} | {st['mean']:.2e} | {st['median']:.2e} | {st['p99']:.2e} | {st['max']:.2e} |"


def markdown(res: dict, command: str, machine: str) -> str:
    f = res["fidelity"]
    lines = [f"Command: `{command}`", "", f"Machine: {machine}", "",
             f"{res['num_prompts']} prompts of {res['prompt_len']} tokens of real text, {res['max_tokens']} greedy "
             "tokens each.", "",
             f"**Engine vs offline reference** (`{f['kv_cache_dtype']}` = preset `{f['preset']}`, float32 engine, "
             f"{f['tokens']} generated tokens; |engine logprob - simulated logprob|):", "",
             "| simulated cache | mean | median | p99 | max |", "| --- | ---: | ---: | ---: | ---: |",
             _stats_row("same preset", f["vs_same_preset"]),
             _stats_row("no compression", f["vs_uncompressed"]), "",
             "The simulated preset against the simulated uncompressed cache (the quantization effect the "
             "engine's row above must match in size), and against itself with its attention inputs moved "
             f"by float32 rounding (Gaussian noise of {ROUNDING_NOISE:g} of each q/k/v's max |value|: the "
             "floor of the engine's first row):", "",
             "| | mean | median | p99 | max |", "| --- | ---: | ---: | ---: | ---: |",
             _stats_row("same preset vs no compression", f["sim_vs_uncompressed"]),
             _stats_row("same preset vs itself, inputs rounded", f["sim_vs_rounding_noise"])]
    if not res["greedy"]:
        return "\n".join(lines) + "\n"
    lines += ["",
              "**Greedy agreement with `auto`** (bfloat16 engine; mean fraction of each generation equal to "
              "`auto`'s before the first divergence; KV capacity as the engine reports it):", "",
              "| --kv-cache-dtype | prefix match vs auto | KV tokens |", "| --- | ---: | ---: |"]
    for d, g in res["greedy"].items():
        if "unsupported" in g:
            lines.append(f"| {d} | not run: {g['unsupported']} | |")
        else:
            lines.append(f"| {d} | {g['mean_prefix_match']:.3f} | {g['kv_tokens']} |")
    return "\n".join(lines) + "\n"
