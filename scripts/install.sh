#!/usr/bin/env bash
# Create .venv and install ooc-ray with its pipeline and test extras. Safe to re-run (pip skips what is installed).
#
#   bash scripts/install.sh                       # cpu or gpu, from what this machine has (nvidia-smi -L)
#   OOC_RAY_DEVICE=cpu bash scripts/install.sh    # or gpu: choose (a GPU image built on a CPU machine, say)
#   OOC_RAY_BACKEND=torch bash scripts/install.sh # no TensorFlow: for classify.backend torch (docs/gpu.md)
#
# Why a choice: on Linux, torch==2.13.0 from PyPI is the CUDA build (several GB of NVIDIA libraries), which a
# CPU machine does not need; the CPU build (2.13.0+cpu, ~190 MB) lives on PyTorch's own index. A local copy of
# the CPU wheel (pip's find-links) is taken first. TensorFlow from PyPI sees no GPU without its CUDA libraries:
# the gpu choice installs tensorflow[and-cuda]. Never torchvision (not needed; breaks beside this torch build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=2.13.0
TENSORFLOW=2.21.0  # the version measured with keras 3.15 (docs/versions.md)
CPU_INDEX=https://download.pytorch.org/whl/cpu

device=${OOC_RAY_DEVICE:-}
if [ -z "$device" ]; then
    if command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then device=gpu; else device=cpu; fi
fi
case "$device" in
    cpu|gpu) ;;
    *) echo "scripts/install.sh: OOC_RAY_DEVICE=$device: choose cpu or gpu" >&2; exit 2 ;;
esac
backend=${OOC_RAY_BACKEND:-tensorflow}  # classify.backend the install serves: which Keras framework it brings
case "$backend" in
    tensorflow) extras=pipeline,test ;;
    torch) extras=pipeline-torch ;;  # the tests need TensorFlow (the default backend's): not installed here
    jax) extras=pipeline-torch,jax ;;
    *) echo "scripts/install.sh: OOC_RAY_BACKEND=$backend: choose tensorflow, torch or jax" >&2; exit 2 ;;
esac
echo "scripts/install.sh: installing the $device build of torch $TORCH and ooc-ray[$extras] into .venv" \
     "(set OOC_RAY_DEVICE=cpu or gpu, OOC_RAY_BACKEND=tensorflow, torch or jax to choose)"

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip)
"${pip[@]}" install -q --upgrade pip
# torch first and pinned: an unpinned `torch` pulled in by diffusers/peft would fetch the CUDA build.
if [ "$device" = gpu ] || [ "$(uname -s)" != Linux ]; then
    # Linux GPU: PyPI's build is the CUDA one. macOS/Windows: PyPI's build is the right one, with no +cpu tag.
    "${pip[@]}" install -q "torch==$TORCH"
    if [ "$device" = gpu ] && [ "$backend" = tensorflow ]; then "${pip[@]}" install -q "tensorflow[and-cuda]==$TENSORFLOW"; fi
    if [ "$device" = gpu ] && [ "$backend" = jax ]; then "${pip[@]}" install -q "jax[cuda12]"; fi
elif ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__ != '$TORCH+cpu')" 2>/dev/null; then
    wheels=$(mktemp -d)
    if "${pip[@]}" download -q --no-index --no-deps "torch==$TORCH+cpu" -d "$wheels" 2>/dev/null; then
        "${pip[@]}" install -q "$wheels"/torch-*.whl  # the local copy; its dependencies from the usual index
    else
        "${pip[@]}" install -q "torch==$TORCH+cpu" --extra-index-url "$CPU_INDEX"
    fi
    rm -rf "$wheels"
fi
"${pip[@]}" install -q -e ".[$extras]"
