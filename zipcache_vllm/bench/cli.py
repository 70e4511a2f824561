"""``zipcache-vllm bench``: benchmark subcommands (cheap to import; work in handlers)."""
from __future__ import annotations

import argparse

from zipcache_vllm.planner.units import human_readable_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks (kernels vs vLLM's bf16 CPU attention)")
    bsub = p.add_subparsers(dest="bench_cmd", metavar="{kernels,prefill,decode,serve}", required=True)
    k = bsub.add_parser(
        "kernels",
        help="decode attention: packed zipcache kernel vs vLLM's bf16 (and fp8) CPU attention",
        description="Time one decode step of attention (one query per request) over contexts of "
        "1k/4k/8k tokens, batch 1 and 8, for SmolLM2 (Hq=9, Hk=3, D=64) and Llama-like "
        "(Hq=32, Hk=8, D=128) shapes; prints a markdown table with speed ratios and the "
        "bytes-read bandwidth next to a measured memory copy bandwidth.",
    )
    k.add_argument("--quick", action="store_true", help="fewer shapes and repetitions (~1 min)")
    k.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    k.add_argument("--preset", default="zipcache", help="quantizing preset of the packed pages")
    k.add_argument("--contexts", default=None, help="comma-separated context lengths (default 1024,4096,8192)")
    k.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8)")
    k.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    k.add_argument("--timer", choices=("wall", "cpu"), default="wall",
                   help="wall: wall-clock median; cpu: thread CPU time, fastest run, 1 thread "
                   "(robust when other jobs share the machine)")
    k.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: C++ kernels vs vLLM's CPU attention (this table); cuda: the Triton "
                   "kernels vs bf16 SDPA on a GPU (triton_kernels/bench.py; extra arguments after "
                   "-- go to it, e.g. -- --contexts 1024,32768 --batches 1,16)")
    k.set_defaults(func=_cmd_kernels)
    pf = bsub.add_parser(
        "prefill",
        help="prefill attention of one layer: zipcache's chunk step vs vLLM's CPU attention ops",
        description="Time one layer's attention work for one request's prompt (same bf16 q/k/v): "
        "zipcache's backend step (rotation, block-by-block attention over the packed prefix, "
        "saliency, packing) against vLLM's CPU_ATTN ops (cache write + causal attention, in the "
        "ISA vLLM picks: amx where the CPU has it), for the SmolLM2 and Llama-like shapes.",
    )
    pf.add_argument("--preset", default="zipcache", help="quantizing preset")
    pf.add_argument("--contexts", default=None, help="comma-separated prompt lengths (default 1024,4096)")
    pf.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    pf.add_argument("--quick", action="store_true", help="one 512-token prompt per shape, few repetitions")
    pf.add_argument("--profile", action="store_true",
                    help="then run zipcache's step once more under torch's profiler and print where "
                    "its time goes (top ops by self time) for each shape and context")
    pf.set_defaults(func=_cmd_prefill)
    from zipcache_vllm.bench.serve import add_parser as add_serve_parser

    add_serve_parser(bsub)  # `bench serve`: throughput per KV dtype through vllm serve

    d = bsub.add_parser(
        "decode",
        help="engine decode/prefill tokens/s per KV dtype through vLLM, ratios vs auto",
        description="Start one real vLLM engine per KV dtype (same model and engine arguments, "
        "all alive at once, one working at a time) and measure, at each context and batch, "
        "prefill tokens/s and decode tokens/s in rounds (every engine once per round, so a "
        "slow spell of a shared machine falls on all dtypes of a round); prints ratios against "
        "`auto` from the same run with the range of the per-round ratios, and a bytes-read "
        "model next to a measured copy bandwidth. fp8 is reported as refused where vLLM "
        "refuses it.",
    )
    d.add_argument("--model", default=None, help="HF model folder (default: the prepared SmolLM2)")
    d.add_argument("--kv-cache-dtype", default="auto,fp8,zipcache", help="comma-separated --kv-cache-dtype values")
    d.add_argument("--contexts", default=None, help="comma-separated prompt lengths (default 1024,4096,8064)")
    d.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8)")
    d.add_argument("--decode-tokens", type=int, default=16, help="tokens generated per request and round")
    d.add_argument("--rounds", type=int, default=6,
                   help="decode rounds per context and batch, every engine once per round (--quick: 2)")
    d.add_argument("--kv-cache-memory-bytes", type=human_readable_int, default=2 * 2**30,
                   help="vLLM's KV budget of every engine (default 2G; vLLM's suffixes, 1G = 2**30)")
    d.add_argument("--prefill-reps", type=int, default=3,
                   help="prefills timed at batch 1 per context, the median reported (--quick: 1)")
    d.add_argument("--quick", action="store_true", help="one short context, batch 1 and 2, 8 tokens, 2 rounds")
    d.add_argument("--profile", action="store_true",
                   help="attach vLLM's torch profiler to every engine and, after the timed cells, "
                        "print where one more round of the first cell's decode steps spends its time "
                        "(ms per step of the costliest ops, per dtype)")
    d.add_argument("--json", default=None, help="also write the raw results here")
    d.add_argument("--update-results", default=None, metavar="MD",
                   help="write the table into this markdown file's bench-decode section (docs/RESULTS.md)")
    d.add_argument("--render", default=None, metavar="JSON",
                   help="do not run: show (and with --update-results write) a run saved with --json")
    d.set_defaults(func=_cmd_decode)


def _cmd_kernels(args) -> int:
    if args.device == "cuda":
        from zipcache_vllm.kernels.triton_loader import load

        return load("bench").main(args.extra)
    from zipcache_vllm.bench.kernels import main

    return main(quick=args.quick, preset=args.preset, contexts=args.contexts, batches=args.batches,
                threads=args.threads, timer=args.timer)


def _cmd_prefill(args) -> int:
    from zipcache_vllm.bench.prefill import main

    return main(preset=args.preset, contexts=args.contexts, quick=args.quick, threads=args.threads,
                profile=args.profile)


def _cmd_decode(args) -> int:
    from zipcache_vllm.bench.decode import main

    return main(model_dir=args.model, dtypes=args.kv_cache_dtype, contexts=args.contexts, batches=args.batches,
                decode_tokens=args.decode_tokens, quick=args.quick, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
                json_out=args.json, update=args.update_results, render=args.render,
                prefill_reps=args.prefill_reps, rounds=args.rounds, profile=args.profile)
