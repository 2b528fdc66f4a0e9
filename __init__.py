"""Conveyor: an asynchronous, multi-process LLM inference engine.

Exports resolve lazily, so the engine-core and worker processes (which import `conveyor.*`
submodules) never pay for importing the frontend's stack.
"""

import importlib
import os
import sys

# The repository root is this package's own directory. Run from a checkout (`python -m ...`,
# pytest), it sits on sys.path, where its subpackages (kernels, ipc, tools, ...) would shadow
# top-level distributions of the same name: transformers imports Hugging Face's `kernels`.
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _PACKAGE_DIR]

_EXPORTS = {
    "AsyncLLM": "conveyor.frontend.async_llm",
    "LLM": "conveyor.frontend.llm",
    "LoRARequest": "conveyor.lora",
    "CompletionOutput": "conveyor.frontend.outputs",
    "RequestMetrics": "conveyor.frontend.outputs",
    "RequestOutput": "conveyor.frontend.outputs",
    "EngineDeadError": "conveyor.frontend.errors",
    "EngineStartupError": "conveyor.frontend.errors",
    "RequestOutputKind": "conveyor.sampling_params",
    "SamplingParams": "conveyor.sampling_params",
    "StructuredOutputsParams": "conveyor.sampling_params",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'conveyor' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
