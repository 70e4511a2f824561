#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, end-to-end tests included.
#   bash scripts/test.sh                 # everything (what CI runs)
#   bash scripts/test.sh -m "not slow"   # inner loop: skip engine/server tests
#   bash scripts/test.sh tests/package/test_cli.py -k serve
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
ZIPCACHE_SETUP_MODELS="${ZIPCACHE_SETUP_MODELS:-smollm2 gemma3-270m}" bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec "$ROOT/.venv/bin/python" -m pytest -q --durations=25 "$@"
