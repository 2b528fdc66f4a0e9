#!/usr/bin/env bash
# Create a private virtualenv holding llama-cpp-python built from source for this CPU, used only by
# the `llamacpp` benchmark backend (tools/bench_runner.py runs inside it). llama.cpp is never a
# Conveyor dependency.
#
#   tools/setup_llama_cpp.sh [VENV_DIR]      # default: .venv-llamacpp (gitignored)
#
# The build compiles llama.cpp's C++ (several minutes on a small machine) with -DGGML_NATIVE=ON, so
# the library uses every instruction set this CPU has (AVX2, AVX-512, VNNI...) and runs only on a
# CPU like it. Needs cmake and a C++ compiler. CMAKE_ARGS in the environment replaces the defaults.
set -euo pipefail

VENV_DIR="${1:-.venv-llamacpp}"
PYTHON="${PYTHON:-python3}"
LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_OPENMP=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF}"

"$PYTHON" -m venv "$VENV_DIR"
"$VENV_DIR/bin/python" -m pip install --upgrade pip
# --no-binary: a prebuilt wheel would be tuned for a generic CPU, not this one.
CMAKE_ARGS="$CMAKE_ARGS" FORCE_CMAKE=1 CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    "$VENV_DIR/bin/python" -m pip install --no-cache-dir --no-binary llama-cpp-python \
    "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}"

"$VENV_DIR/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__); print(llama_cpp.llama_print_system_info().decode())"
echo "llama.cpp venv ready: $VENV_DIR"
