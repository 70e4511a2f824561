#!/usr/bin/env bash
# Set up (idempotent) and serve the bundled SmolLM2-135M-Instruct on http://127.0.0.1:8000
# (OpenAI-compatible API). Extra arguments go to `zipcache-vllm serve`, and from there
# unknown ones to `vllm serve`, e.g.:
#   bash scripts/serve.sh --port 8001 --kv-cache-dtype auto --max-model-len 4096
# The environment it runs vLLM with (HF_HUB_OFFLINE and VLLM_CPU_KVCACHE_SPACE unless set,
# VLLM_PLUGINS with ours and vLLM's defaults) comes from `zipcache-vllm serve`; add --dry-run
# to print it and the command.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
exec "$ROOT/.venv/bin/zipcache-vllm" serve "$@"
