#!/usr/bin/env bash
# Quick start 2: set up, then run the whole test suite (slow cluster-style tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
.venv/bin/python -m pytest "$@"
