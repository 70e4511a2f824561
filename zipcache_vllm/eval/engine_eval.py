"""``zipcache-vllm eval --engine``: every KV dtype through the real vLLM engine, against ``auto``.

For each of ``auto``, ``fp8`` and every quantizing preset's ``--kv-cache-dtype``
(:func:`zipcache_vllm.dtypes.cache_dtypes`, so a new preset file adds a
row) the engine starts once at the same KV budget (all engines one after another in
one :mod:`engine_worker` process) and runs three jobs:

* **capacity**: the engine's KV tokens (``num_gpu_blocks * block_size``) and the ratio
  to ``auto``; bytes per token = budget / tokens (staging reserve included).
* **teacher forcing** on real prose (:mod:`corpus`): ``prompt_logprobs=k`` for every
  position of long windows, prefilled in small chunks so later chunks read earlier
  ones from the packed cache. Every dtype scores the same token sequence, so per
  position we compare the dtype's distribution with ``auto``'s: KL (estimated from
  the top-k, :func:`topk_kl`), top-1 agreement, perplexity. Positions of the first
  chunk (which reads no packed block) are left out.
* **generation**: greedy continuations of prose prompts, scored as the fraction
  equal to ``auto``'s before the first divergence; and an exact task (:func:`copy_task`).

vLLM refuses ``fp8`` on CPUs without AVX-512/AMX: the row records the refusal.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from ..engine_proc import run_worker

BASELINE = "auto"
#: vLLM's own cache dtypes an engine eval may compare against (no plugin needed).
VLLM_DTYPES = ("auto", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2")
WORKER_MARK = "[engine_worker] "  # engine_worker's line as each dtype's engine starts


@dataclass(frozen=True)
class Settings:
    """Workload of one run (the same for every dtype)."""

    score_windows: int  # prose windows scored with teacher forcing
    score_len: int  # tokens per window
    chunk: int  # --max-num-batched-tokens: prefill chunk
    gen_prompts: int  # greedy prompts
    gen_len: int  # tokens per greedy prompt
    gen_tokens: int  # greedy tokens per prompt
    task_items: int  # exact-answer items
    logprobs: int = 20  # top-k per position
    kv_space_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE
    max_num_seqs: int = 8
    max_model_len: int = 2048


QUICK = Settings(score_windows=1, score_len=512, chunk=256, gen_prompts=2, gen_len=256, gen_tokens=8,
                 task_items=4)
FULL = Settings(score_windows=2, score_len=1024, chunk=256, gen_prompts=4, gen_len=256, gen_tokens=16,
                task_items=16)

# Exact task: copy a passage of real prose. The prompt is the passage twice, then its first
# COPY_CUE tokens a third time (blank lines between); the answer is the next COPY_ANSWER
# tokens, scored exactly (all token ids equal). Measured first, bf16 in HF transformers:
# 10/10 with the passage shown twice, 2/10 with it shown once (the 135M model copies
# reliably only once the repetition pattern is in the context). Both copies start in
# blocks that are packed when the prompt is prefilled: the answer is read from the
# compressed cache.
COPY_PASSAGE = 200
COPY_CUE = 16
COPY_ANSWER = 8


def dtypes() -> list[str]:
    """``auto``, ``fp8``, then every quantizing preset's cache dtype (default preset first)."""
    from ..dtypes import cache_dtypes

    ours = sorted(cache_dtypes(), key=lambda d: (d != "zipcache", d))
    return [BASELINE, "fp8", *ours]


def known_dtypes() -> list[str]:
    """Every ``--kv-cache-dtype`` an engine eval can run: :func:`dtypes` and vLLM's own
    unquantized / fp8 names."""
    return [*dtypes(), *(n for n in VLLM_DTYPES if n not in (BASELINE, "fp8"))]


def copy_task(ids: list[int], newline_ids: list[int], count: int, seed: int = 0) -> tuple[list, list]:
    """``count`` copy items from the token stream ``ids``: (prompts, expected answers)."""
    rng = random.Random(seed)
    prompts, answers = [], []
    for _ in range(count):
        o = rng.randrange(len(ids) - COPY_PASSAGE)
        passage = ids[o:o + COPY_PASSAGE]
        prompts.append(passage + newline_ids + passage + newline_ids + passage[:COPY_CUE])
        answers.append(passage[COPY_CUE:COPY_CUE + COPY_ANSWER])
    return prompts, answers


def topk_kl(p_ids: list[int], p_lps: list[float], q_ids: list[int], q_lps: list[float]) -> float:
    """KL(P || Q) estimated from the top-k of each distribution.

    Over the union U of both top-k sets, each side's probability is known where the
    token is in its own top-k; a token missing from one side's top-k is below that
    side's k-th probability, so it gets min(k-th probability, that side's remaining
    mass / (number missing + 1)). All other tokens are lumped into one tail bin
    (1 - mass on U). KL over the partition U + tail; lumping can only lower KL, so
    with exact values on U this is a lower bound of the full-vocabulary KL.
    """
    p = {t: math.exp(x) for t, x in zip(p_ids, p_lps)}
    q = {t: math.exp(x) for t, x in zip(q_ids, q_lps)}
    union = set(p) | set(q)

    def fill(d: dict) -> tuple[dict, float]:
        missing = union - set(d)
        rest = max(0.0, 1.0 - sum(d.values()))
        if missing:
            v = min(min(d.values()), rest / (len(missing) + 1))
            d = {**d, **{t: v for t in missing}}
        return d, max(1e-12, 1.0 - sum(d.values()))

    p, pt = fill(p)
    q, qt = fill(q)
    kl = sum(p[t] * math.log(p[t] / max(q[t], 1e-30)) for t in union if p[t] > 0)
    return max(0.0, kl + pt * math.log(pt / qt))


def prefix_match(a: list[int], b: list[int]) -> float:
    from .fidelity import prefix_match as pm

    return pm(a, b)


def _preset_fields(cache_dtype: str) -> dict | None:
    """The preset a zipcache dtype serves, as its fields (None for vLLM's own dtypes)."""
    from ..dtypes import is_zipcache_dtype, preset_for_dtype

    return preset_for_dtype(cache_dtype).model_dump() if is_zipcache_dtype(cache_dtype) else None


def run_engines(jobs: list[dict], workdir: Path, progress: bool = True, timeout: float = 7200) -> list[dict]:
    """Each job's result (``{"unsupported": msg}`` where vLLM refuses the dtype).

    The jobs not yet done run in ONE :mod:`engine_worker` process (vLLM imported once,
    one engine per dtype in turn; a progress bar follows its dtypes). A result is kept
    in ``workdir`` under a hash of its job: a later call with the same job and work dir
    reads it instead of starting the engine again (the hash covers a zipcache dtype's
    preset fields too, so an edited preset runs again).
    """
    from tqdm.auto import tqdm

    outs = []
    for job in jobs:
        key = hashlib.sha256(json.dumps([job, _preset_fields(job["kv_cache_dtype"])],
                                        sort_keys=True).encode()).hexdigest()[:16]
        outs.append(workdir / f"out_{job['kv_cache_dtype']}_{key}.json")
    todo = [{"job": job, "out": str(out)} for job, out in zip(jobs, outs) if not out.exists()]
    if todo:
        jfile = workdir / f"jobs_{Path(todo[0]['out']).stem}_{len(todo)}.json"
        jfile.write_text(json.dumps(todo))
        with tqdm(total=len(todo), desc="engine runs", disable=not progress) as bar:
            def follow(text: str) -> None:  # a dtype's mark: the one before it is done
                started = [line[len(WORKER_MARK):].strip() for line in text.splitlines()
                           if line.startswith(WORKER_MARK)]
                if len(started) - 1 > bar.n:
                    bar.update(len(started) - 1 - bar.n)
                    bar.set_postfix_str(started[-1])

            run_worker("zipcache_vllm.eval.engine_worker", ["--jobs", str(jfile)], workdir / f"{jfile.stem}.log",
                       "engine runs", timeout, progress=follow)
            bar.update(bar.total - bar.n)
    return [json.loads(out.read_text()) for out in outs]


def build_inputs(model_dir: str, s: Settings) -> dict:
    """Token ids of the scored windows, the greedy prompts and the copy task (disjoint text)."""
    from transformers import AutoTokenizer

    from .corpus import english_text

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(english_text(), add_special_tokens=False)["input_ids"]
    third = len(ids) // 3
    need = s.score_windows * s.score_len
    if need > third:
        raise ValueError(f"the corpus has {len(ids)} tokens: too few for {s.score_windows} x {s.score_len}")
    stride = third // s.score_windows
    score = [ids[i * stride:i * stride + s.score_len] for i in range(s.score_windows)]
    gstride = third // s.gen_prompts
    gen = [ids[third + i * gstride:third + i * gstride + s.gen_len] for i in range(s.gen_prompts)]
    nl = tok("\n\n", add_special_tokens=False)["input_ids"]
    task, answers = copy_task(ids[2 * third:], nl, s.task_items)
    return {"score": score, "gen": gen, "task": task, "answers": answers}


@dataclass
class Row:
    kv_cache_dtype: str
    kv_tokens: int | None = None
    capacity_ratio: float | None = None
    bytes_per_token: float | None = None  # KV budget / KV tokens, every layer
    kl: float | None = None
    top1: float | None = None
    ppl: float | None = None
    greedy_match: float | None = None
    task_acc: float | None = None
    unsupported: str | None = None
    kv_tokens_logged: int | None = None  # vLLM's "KV cache size: N tokens" (whole requests of max_model_len)
    kl_range: tuple[float, float] | None = None  # lowest and highest KL of one text window: the spread


def score_rows(ref: dict, res: dict, answers: list, first: int) -> dict:
    """Metrics of one run vs the reference run; positions before ``first`` are left out."""
    kls, agree, nll, window_kl = [], [], [], []
    for a, b in zip(ref["score"], res["score"]):
        start = len(kls)
        for j in range(first, len(a["target"])):
            kls.append(topk_kl(a["top_ids"][j], a["top_lps"][j], b["top_ids"][j], b["top_lps"][j]))
            agree.append(a["top_ids"][j][0] == b["top_ids"][j][0])
            nll.append(-b["target"][j])
        window_kl.append(sum(kls[start:]) / max(len(kls) - start, 1))
    n = len(kls)
    greedy = [prefix_match(g, r) for g, r in zip(res["gen"], ref["gen"])]
    task = [g[:len(x)] == x for g, x in zip(res["task"], answers)]
    return {"kl": sum(kls) / n, "kl_range": (min(window_kl), max(window_kl)), "top1": sum(agree) / n, "ppl": math.exp(sum(nll) / n), "positions": n,
            "greedy_match": sum(greedy) / len(greedy), "task_acc": sum(task) / len(task)}


def evaluate(model_dir: str, s: Settings, names: list[str] | None = None, progress: bool = True,
             work_dir: str | None = None) -> dict:
    """Run every dtype; returns ``{"settings", "positions", "rows", "seconds"}``.

    ``work_dir``: keep each engine run's output there, and reuse it on the next call
    (a long run can be split over several invocations); default: a temporary folder.
    """
    names = names or dtypes()
    if names[0] != BASELINE:
        names = [BASELINE] + [n for n in names if n != BASELINE]
    inputs = build_inputs(model_dir, s)
    from ..calibration import rotated_layers

    # the calibration is part of a job: a result kept in work_dir is not reused after it changes
    base_job = {"model": model_dir, "calibration": rotated_layers(model_dir), "chunk": s.chunk, "max_model_len": s.max_model_len,
                "max_num_seqs": s.max_num_seqs, "logprobs": s.logprobs, "kv_space_gib": s.kv_space_gib,
                "score": inputs["score"], "gen": inputs["gen"], "gen_tokens": s.gen_tokens,
                "task": inputs["task"], "task_tokens": COPY_ANSWER}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        runs = dict(zip(names, run_engines([{**base_job, "kv_cache_dtype": n} for n in names], work,
                                           progress=progress)))
    ref = runs[BASELINE]
    rows, seconds = [], {}
    for name in names:
        r = runs[name]
        if "unsupported" in r:
            rows.append(Row(name, unsupported=r["unsupported"]))
            continue
        seconds[name] = r["seconds"]
        tokens = r["num_gpu_blocks"] * r["block_size"]
        m = score_rows(ref, r, inputs["answers"], s.chunk)
        rows.append(Row(name, tokens, tokens / (ref["num_gpu_blocks"] * ref["block_size"]),
                        r["kv_cache_memory_bytes"] / tokens, m["kl"], m["top1"], m["ppl"],
                        m["greedy_match"], m["task_acc"], kv_tokens_logged=r["kv_cache_size_tokens"],
                        kl_range=m["kl_range"]))
    return {"model": Path(model_dir).name, "settings": asdict(s), "positions": m["positions"],
            "rows": [asdict(r) for r in rows], "seconds": seconds}


def markdown(res: dict, command: str, machine: str) -> str:
    s = res["settings"]
    lines = [
        f"Command: `{command}`", "", f"Machine: {machine}", "",
        f"Engine: vLLM (CPU), `{res.get('model', 'the model')}` in bfloat16, "
        f"`VLLM_CPU_KVCACHE_SPACE={s['kv_space_gib']}` GiB, "
        f"`--max-num-seqs {s['max_num_seqs']}`, `--max-num-batched-tokens {s['chunk']}` (chunked prefill), "
        "`--enforce-eager`, no prefix caching. One engine start per dtype.", "",
        f"* Teacher forcing: {s['score_windows']} windows of {s['score_len']} tokens of prose, "
        f"`prompt_logprobs={s['logprobs']}`; metrics over the {res['positions']} positions after the "
        f"first {s['chunk']}-token chunk (each reads earlier chunks from the packed cache). KL(auto || dtype) "
        "from the top-k of both runs (union of the two top-k sets, tail mass lumped; see "
        "`zipcache_vllm/eval/engine_eval.py:topk_kl`). KL per window: the lowest and highest mean KL of "
        "one text window (the spread).",
        f"* Greedy: {s['gen_prompts']} prose prompts of {s['gen_len']} tokens, {s['gen_tokens']} tokens each; "
        "mean fraction equal to `auto`'s before the first divergence.",
        f"* Copy task: {s['task_items']} items; a {COPY_PASSAGE}-token prose passage twice, then its first "
        f"{COPY_CUE} tokens again (blank lines between); correct if the next {COPY_ANSWER} greedy tokens equal "
        "the passage's (both copies sit in blocks that are packed after prefill).", "",
        "| --kv-cache-dtype | KV tokens | vs auto | bytes/token | KL vs auto | KL per window | top-1 agree "
        "| perplexity | greedy match | copy task |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in res["rows"]:
        if r["unsupported"]:
            lines.append(f"| {r['kv_cache_dtype']} | refused by vLLM: {r['unsupported']} | | | | | | | | |")
            continue
        lines.append(
            f"| {r['kv_cache_dtype']} | {r['kv_tokens']:,} | {r['capacity_ratio']:.2f}x | "
            f"{r['bytes_per_token']:,.0f} | {r['kl']:.4f} | {_spread(r.get('kl_range'))} | {r['top1']:.1%} | "
            f"{r['ppl']:.3f} | "
            f"{r['greedy_match']:.3f} | {r['task_acc']:.1%} |")
    return "\n".join(lines) + "\n"


def _spread(lo_hi) -> str:
    """``lo-hi`` of the per-window KL (a single window: its value; older results: blank)."""
    if not lo_hi:
        return ""
    lo, hi = lo_hi
    return f"{lo:.4f}" if lo == hi else f"{lo:.4f}-{hi:.4f}"


def plot(res: dict, path: str) -> None:
    """Quality vs bytes per token, one point per dtype (KL and copy-task accuracy panels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["rows"] if not r["unsupported"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = [("kl", "KL(auto || dtype), teacher forcing", True), ("task_acc", "copy task accuracy", False)]
    for ax, (key, label, log) in zip(axes, panels):
        for r in rows:
            y = r[key] if not (log and r[key] <= 0) else 1e-5
            ax.scatter(r["bytes_per_token"], y, color="C3" if r["kv_cache_dtype"] == "zipcache" else "C0")
            ax.annotate(r["kv_cache_dtype"].replace("zipcache_", "zc_"), (r["bytes_per_token"], y),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("KV bytes per token, every layer (engine budget / engine KV tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Quality vs memory through the vLLM engine ({res.get('model', 'model')})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
