"""``zipcache-vllm reliability load``: start a server, drive it with many clients, check it.

    zipcache-vllm reliability load                      # 64 in flight, 96 requests, zipcache
    zipcache-vllm reliability load --num-prompts 512 --kv-cache-dtype auto --json out.json

Starts ``vllm serve`` (loopback, with the zipcache worker extension), runs the load of
:mod:`.load`, waits for the engine to go idle, then checks: no 5xx, every response well
formed, every worker's staging slots and saliency state back to zero, and the engine
still gives the same greedy answer to a probe question as before the load. Prints a
table (and writes JSON with ``--json``); exits 1 if any check fails.
"""
from __future__ import annotations

import json
import sys

PROBE = "What is the capital of France? Answer in one sentence."
PROBE_TOKENS = 24


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("reliability", help="load / fault checks against a real vllm serve")
    sub = p.add_subparsers(dest="reliability_cmd", metavar="{load}", required=True)
    lp = sub.add_parser("load", help="many concurrent clients against a fresh server, then checks",
                        description=__doc__.split("\n\n")[2] if __doc__ else None)
    lp.add_argument("--model", default=None, help="HF model folder (default: the bundled SmolLM2)")
    lp.add_argument("--kv-cache-dtype", default="zipcache")
    lp.add_argument("--max-concurrency", type=int, default=64, help="concurrent clients (requests in flight)")
    lp.add_argument("--num-prompts", type=int, default=96, help="requests in all")
    lp.add_argument("--max-tokens", type=int, default=8)
    lp.add_argument("--max-model-len", type=int, default=512)
    lp.add_argument("--max-num-seqs", type=int, default=None,
                    help="passed to vllm serve (default: vLLM's own default)")
    lp.add_argument("--num-gpu-blocks-override", type=int, default=16,
                    help="vLLM's: KV blocks in all; small values force preemption")
    lp.add_argument("--duration", type=float, default=900.0, help="no request is issued after this")
    lp.add_argument("--seed", type=int, default=0)
    lp.add_argument("--json", default=None, help="write the full result here")
    lp.set_defaults(func=_cmd_load)


def server_args(kv_cache_dtype: str, max_num_seqs: int | None, num_gpu_blocks: int | None) -> list[str]:
    """``vllm serve`` flags of the reliability servers (``max_num_seqs`` None: vLLM's default)."""
    from .server import WORKER_EXT

    args = ["--kv-cache-dtype", kv_cache_dtype, "--worker-extension-cls", WORKER_EXT]
    if max_num_seqs:
        args += ["--max-num-seqs", str(max_num_seqs)]
    if num_gpu_blocks:
        args += ["--num-gpu-blocks-override", str(num_gpu_blocks)]
    return args


def load_and_verify(server, tokenizer, *, clients: int = 64, requests: int = 128,
                    max_tokens: int = 16, max_model_len: int = 1024, duration_s: float = 900.0,
                    seed: int = 0, progress: bool = True) -> dict:
    """Run the load against a ready ``server`` and every check after it (see module doc)."""
    import asyncio

    from ..eval.corpus import corpus_ids
    from .load import LoadConfig, run_load
    from .server import leaked

    before = server.chat(PROBE, max_tokens=PROBE_TOKENS)
    ids = corpus_ids(tokenizer)
    cfg = LoadConfig(url=server.url, model=server.model_name(), corpus_ids=ids, clients=clients,
                     requests=requests, duration_s=duration_s, max_model_len=max_model_len,
                     max_tokens=max_tokens, seed=seed)
    report, _ = asyncio.run(run_load(cfg, tokenizer.decode, progress=progress))
    state = server.wait_idle(timeout=180)
    after = server.chat(PROBE, max_tokens=PROBE_TOKENS)
    text = lambda r: r["json"]["choices"][0]["message"]["content"] if r["status"] == 200 else None  # noqa: E731
    result = {
        "load": report.to_dict(),
        "worker_state_after": state,
        "leaked": sum(leaked(s) for s in state),
        "preemptions": server.metric("vllm:num_preemptions_total"),
        "probe_before": text(before),
        "probe_after": text(after),
    }
    result["probe_same"] = result["probe_before"] is not None and result["probe_before"] == result["probe_after"]
    result["passed"] = bool(report.clean and result["leaked"] == 0 and result["probe_same"]
                            and report.requests == requests)
    return result


def format_result(r: dict) -> str:
    ld = r["load"]
    rows = [("requests", ld["requests"]), ("concurrent clients", ld["clients"]),
            ("peak requests in flight", ld["peak_in_flight"]), ("elapsed s", ld["elapsed_s"]),
            ("HTTP status counts", ld["status_counts"]), ("5xx", ld["errors_5xx"]),
            ("transport errors", ld["transport_errors"]), ("malformed", ld["malformed"]),
            ("client disconnects mid-stream", ld["disconnected"]),
            ("prompt tokens (max)", f"{ld['prompt_tokens']} ({ld['max_prompt_tokens']})"),
            ("completion tokens", ld["completion_tokens"]), ("preemptions", r["preemptions"]),
            ("leaked slots + saliency entries", r["leaked"]),
            ("probe answer unchanged", r["probe_same"]), ("passed", r["passed"])]
    lines = ["| measure | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows]
    if ld["problems"]:
        lines += ["", "problems:"] + [f"- {p}" for p in ld["problems"]]
    return "\n".join(lines)


def _cmd_load(args) -> int:
    import signal

    from transformers import AutoTokenizer

    from ..model.prepare import prepare_default_model
    from .server import Server

    model = args.model or str(prepare_default_model())
    tok = AutoTokenizer.from_pretrained(model)
    # SIGTERM unwinds like Ctrl-C, so the server (its own process group) is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with Server(model, *server_args(args.kv_cache_dtype, args.max_num_seqs, args.num_gpu_blocks_override),
                max_model_len=args.max_model_len) as server:
        server.wait_ready()
        result = load_and_verify(server, tok, clients=args.max_concurrency, requests=args.num_prompts,
                                 max_tokens=args.max_tokens, max_model_len=args.max_model_len,
                                 duration_s=args.duration, seed=args.seed)
    result["config"] = {k: v for k, v in vars(args).items() if k not in ("func",) and not callable(v)}
    print(format_result(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    from ..cli import main

    sys.exit(main(["reliability", *sys.argv[1:]]))
