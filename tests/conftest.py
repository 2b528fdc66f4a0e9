import os

# Triton reads this when a kernel is *decorated*: set it before any kernel module is imported, so
# every Triton kernel in the suite runs under the interpreter on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from conveyor.tools.make_tiny_model import make_tiny_model  # noqa: E402

ARCHS = ("llama", "qwen2", "qwen3", "mistral")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """One tiny Hugging Face model directory per supported architecture, built once per run."""
    root = tmp_path_factory.mktemp("models")
    return {arch: str(make_tiny_model(root / arch, arch)) for arch in ARCHS}


@pytest.fixture(scope="session")
def llama_dir(tiny_models) -> str:
    return tiny_models["llama"]
