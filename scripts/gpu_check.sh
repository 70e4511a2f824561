#!/usr/bin/env bash
# GPU check of the Triton kernels (the CUDA path): every Triton test compiled and run on
# the GPU, then the decode-attention benchmark vs bf16 (1k to 128k context, GB/s against
# the card's datasheet bandwidth), written as one markdown report. Needs python with
# torch + triton and a CUDA GPU; no vLLM, no network, no install (the repository is put
# on PYTHONPATH).
#
#   scripts/gpu_check.sh [REPORT.md]
#
# Report: REPORT.md, else $OUT/gpu_check.md when $OUT is a folder, else ./gpu_check.md;
# each stage's full output goes to the folder REPORT.logs/ beside it.
# Stages and their time limits (seconds; 470 in all, under 8 minutes):
#   preflight 40 | collect 60 | tests 210 (GPU_CHECK_SHARDS pytest processes, default 4)
#   | bench 130 | report 30
# A failing or timed-out stage does not stop the next ones; the report says what ran.
# Exit: 0 everything passed; 1 it ran and something failed (see the report); 2 it cannot
# run here (one line on stderr saying why, nothing written).
#
# Environment:
#   PYTHON                 interpreter with torch + triton (default: python3)
#   GPU_CHECK_SHARDS       parallel pytest processes for the tests (default 4)
#   GPU_CHECK_K            a pytest -k expression selecting among the Triton tests (default: all)
#   GPU_CHECK_BENCH_ARGS   the benchmark's arguments (default: the contexts and batches below)
#   GPU_CHECK_CPU_SELFTEST=1  check this script on a machine without a GPU: kernels in
#                          Triton's interpreter, one tiny bench cell; the report says
#                          "NOT a GPU result" (tests/kernels/test_gpu_check.py)
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
SELFTEST=${GPU_CHECK_CPU_SELFTEST:-0}
SHARDS=${GPU_CHECK_SHARDS:-4}
T_PREFLIGHT=40 T_COLLECT=60 T_TESTS=210 T_BENCH=130 T_REPORT=30
BENCH_ARGS=${GPU_CHECK_BENCH_ARGS:---contexts 1024,4096,16384,32768,65536,131072 --batches 1,16}

if [[ $# -ge 1 ]]; then REPORT=$1
elif [[ -n "${OUT:-}" && -d "$OUT" ]]; then REPORT=$OUT/gpu_check.md
elif [[ -n "${OUT:-}" ]]; then REPORT=$OUT
else REPORT=./gpu_check.md
fi

die() { echo "gpu_check: $*" >&2; exit 2; }

command -v "$PY" >/dev/null 2>&1 || die "no python interpreter '$PY' (set PYTHON); nothing run"
command -v timeout >/dev/null 2>&1 || die "the 'timeout' command (coreutils) is missing; nothing run"
REPORT_DIR=$(dirname "$REPORT")
[[ -d "$REPORT_DIR" ]] || die "report folder $REPORT_DIR does not exist; nothing run"
REPORT=$(cd "$REPORT_DIR" && pwd)/$(basename "$REPORT")

cd "$ROOT" || die "cannot enter $ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
if [[ "$SELFTEST" == 1 ]]; then
    export TRITON_INTERPRET=1
    BENCH_ARGS="--device cpu --interpret --quick"
else
    unset TRITON_INTERPRET  # the interpreter would time numpy, not the GPU
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || die "mktemp failed"
trap 'rm -rf "$WORK"' EXIT

# --- preflight: torch, triton, a CUDA GPU; facts for the report ----------------------
SECONDS=0
timeout -k 5 "$T_PREFLIGHT" "$PY" - "$SELFTEST" >"$WORK/env.json" 2>"$WORK/preflight.log" <<'EOF'
import json, platform, subprocess, sys, time

selftest = sys.argv[1] == "1"
env = dict(python=platform.python_version(), selftest=selftest,
           date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
try:
    import torch
except Exception as exc:
    print(json.dumps(dict(error=f"torch does not import with {sys.executable} ({exc})")))
    sys.exit(0)
env.update(torch=torch.__version__, torch_cuda=torch.version.cuda)
try:
    import triton
    env["triton"] = triton.__version__
except Exception as exc:
    print(json.dumps(dict(error=f"triton does not import ({exc}); torch {torch.__version__}")))
    sys.exit(0)
try:
    import pytest
    env["pytest"] = pytest.__version__
except Exception:
    env["pytest"] = None
if selftest:
    env["gpu"] = "none (CPU self-test, Triton interpreter)"
elif not torch.cuda.is_available():
    built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    print(json.dumps(dict(error=f"no CUDA GPU: torch.cuda.is_available() is False "
                                f"(torch {torch.__version__}, {built}); nothing run")))
    sys.exit(0)
else:
    props = torch.cuda.get_device_properties(0)
    env.update(gpu=torch.cuda.get_device_name(0), capability=f"{props.major}{props.minor}",
               sms=props.multi_processor_count, memory_gib=props.total_memory / 2**30,
               gpu_count=torch.cuda.device_count())
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        env["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else None
    except Exception:
        env["driver"] = None
try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            timeout=10)
    env["commit"] = commit.stdout.strip() if commit.returncode == 0 else None
except Exception:
    env["commit"] = None
print(json.dumps(env))
EOF
rc=$?
[[ $rc -eq 0 ]] || die "preflight failed (exit $rc$( [[ $rc -eq 124 ]] && echo ": timed out after ${T_PREFLIGHT}s")): $(tail -n 1 "$WORK/preflight.log")"
ERR=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("error", ""))' "$WORK/env.json" 2>/dev/null) \
    || die "preflight printed no facts: $(tail -n 1 "$WORK/preflight.log")"
[[ -z "$ERR" ]] || die "$ERR"

# From here on it runs: output goes to the report and its logs.
LOGS=${REPORT%.md}.logs
rm -rf "$LOGS" && mkdir -p "$LOGS" || die "cannot create $LOGS"
cp "$WORK/env.json" "$WORK/preflight.log" "$LOGS/"
STAGES=$LOGS/stages.tsv
: >"$STAGES"
record() {  # record NAME RC SECONDS LIMIT [NOTE]
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5:-}" >>"$STAGES"
}
record preflight 0 "$SECONDS" "$T_PREFLIGHT" "$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["gpu"])' "$LOGS/env.json")"
echo "gpu_check: $(tail -n 1 "$STAGES" | cut -f5); report: $REPORT"

# --- tests: collect every Triton test, run them in parallel shards --------------------
TEST_FILES=(tests/kernels/test_triton_kernels.py tests/step/test_triton_flow.py)
HAVE_PYTEST=$("$PY" -c 'import json,sys; print(1 if json.load(open(sys.argv[1]))["pytest"] else 0)' "$LOGS/env.json")
: >"$LOGS/ids.txt"
SHARD_LOGS=()
if [[ "$HAVE_PYTEST" != 1 ]]; then
    record collect 3 0 "$T_COLLECT" "pytest is not installed: no test ran"
else
    t0=$SECONDS
    select=()
    [[ -n "${GPU_CHECK_K:-}" ]] && select=(-k "$GPU_CHECK_K")
    timeout -k 5 "$T_COLLECT" "$PY" -m pytest --collect-only -q -p no:cacheprovider \
        "${select[@]}" "${TEST_FILES[@]}" >"$LOGS/collect.log" 2>&1
    rc=$?
    grep -E '^tests/[^ ]+::' "$LOGS/collect.log" >"$LOGS/ids.txt"
    N=$(wc -l <"$LOGS/ids.txt")
    # exit 2 with ids: some file did not import (reported as an error), the rest still runs
    record collect "$( [[ $rc -eq 2 && $N -gt 0 ]] && echo 0 || echo $rc )" $((SECONDS - t0)) "$T_COLLECT" \
        "$N tests in ${TEST_FILES[*]}$( [[ $rc -ne 0 ]] && echo "; pytest exit $rc: $(tail -n 1 "$LOGS/collect.log")")"
    SHARD_LOGS+=("$LOGS/collect.log")
    if [[ $N -gt 0 ]]; then
        echo "gpu_check: running $N Triton tests in $SHARDS processes (limit ${T_TESTS}s)"
        # contiguous chunks: neighbouring tests share a kernel specialization (one compile)
        split -d -n "l/$SHARDS" "$LOGS/ids.txt" "$WORK/shard."
        t0=$SECONDS
        pids=()
        for f in "$WORK"/shard.*; do
            [[ -s "$f" ]] || continue
            mapfile -t ids <"$f"
            log=$LOGS/tests.$(basename "$f" | cut -d. -f2).log
            SHARD_LOGS+=("$log")
            timeout -k 10 "$T_TESTS" "$PY" -m pytest -v -p no:cacheprovider --color=no "${ids[@]}" \
                >"$log" 2>&1 &
            pids+=($!)
        done
        worst=0
        for pid in "${pids[@]}"; do
            wait "$pid"
            rc=$?
            if [[ $rc -eq 124 || $rc -eq 137 ]]; then worst=$rc
            elif [[ $rc -gt $worst && $worst -ne 124 && $worst -ne 137 ]]; then worst=$rc
            fi
        done
        record tests "$worst" $((SECONDS - t0)) "$T_TESTS" "${#pids[@]} pytest processes"
    fi
fi

# --- bench: decode attention vs bf16, rows written as measured -----------------------
echo "gpu_check: decode benchmark (limit ${T_BENCH}s): $BENCH_ARGS"
RUN_BENCH='import sys; from zipcache_vllm.kernels.triton_loader import load; sys.exit(load("bench").main(sys.argv[1:]))'
t0=$SECONDS
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words
timeout -k 10 "$T_BENCH" "$PY" -c "$RUN_BENCH" --jsonl "$LOGS/bench.jsonl" $BENCH_ARGS >"$LOGS/bench.log" 2>&1
rc=$?
record bench "$rc" $((SECONDS - t0)) "$T_BENCH" "$(grep -c '"kind": "row"' "$LOGS/bench.jsonl" 2>/dev/null || echo 0) rows"

# --- report --------------------------------------------------------------------------
log_args=()
for log in "${SHARD_LOGS[@]}"; do log_args+=(--tests-log "$log"); done
t0=$SECONDS
timeout -k 5 "$T_REPORT" "$PY" -c "$RUN_BENCH" report --env "$LOGS/env.json" --stages "$STAGES" \
    --ids "$LOGS/ids.txt" "${log_args[@]}" --bench-jsonl "$LOGS/bench.jsonl" --out "$REPORT" \
    >"$LOGS/report.log" 2>&1
rc=$?
if [[ $rc -ne 0 && $rc -ne 1 ]]; then  # the report writer itself failed: a minimal report
    {
        echo "# zipcache Triton kernels: GPU check"
        echo
        echo "**Result: FAIL: the report writer failed (exit $rc): $(tail -n 1 "$LOGS/report.log")**"
        echo
        echo "| stage | exit | seconds | limit | note |"
        echo "|---|---|---|---|---|"
        sed 's/\t/ | /g; s/^/| /; s/$/ |/' "$STAGES"
        echo
        echo "Logs: $LOGS"
    } >"$REPORT"
    rc=1
fi
echo "gpu_check: $(grep -m1 '^\*\*Result' "$REPORT" | tr -d '*') (${SECONDS}s); report: $REPORT; logs: $LOGS"
exit "$rc"
