#!/usr/bin/env bash
# Quick start 1: set up, then run the main job on the tiny default models.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
mkdir -p out
.venv/bin/vita-audio tts "Hello from VITA-Audio on Ray." -o out/hello.wav --num-gpus 3 --json
