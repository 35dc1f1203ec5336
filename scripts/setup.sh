#!/usr/bin/env bash
# Create .venv at the repo root and install the project (idempotent: skips when pyproject.toml is unchanged).
# torch goes first: any other torch request on these machines pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.installed-$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q -e '.[test]'
  # DeepSpeed ships only an sdist; build it against the installed torch, ops JIT-compiled on first use.
  DS_BUILD_OPS=0 .venv/bin/pip install -q --no-build-isolation deepspeed==0.19.8
  rm -f .venv/.installed-*
  touch "$stamp"
fi
