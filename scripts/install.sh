#!/usr/bin/env bash
# Create .venv and install ooc-ray with its test extras. Safe to re-run (pip skips what is installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned `torch` pulled in by diffusers/peft would fetch a multi-GB CUDA build
# on machines that only need the CPU one. Never torchvision (not needed; breaks beside this torch build).
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
