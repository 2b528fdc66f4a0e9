"""Builds a model and fills it from (sharded) safetensors or a GGUF file, tensor by tensor, so peak
memory stays near the size of the model itself."""

import json
import logging
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open

from conveyor.gpu_worker.gguf_loader import iterate_gguf_weights, rope_freq_factors
from conveyor.gpu_worker.models import get_model_class
from conveyor.gpu_worker.models.rotary import build_cos_sin_cache

logger = logging.getLogger(__name__)


def safetensors_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, s) for s in shards]
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {model_dir}")
    return [os.path.join(model_dir, f) for f in files]


def iterate_weights(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    for path in safetensors_files(model_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_model(model_dir: str, hf_config, dtype: torch.dtype, device: torch.device, ops,
               gguf=None) -> torch.nn.Module:
    """Weights from `gguf` (a GGUFReader of a file in `model_dir`) where given, else safetensors."""
    model_class = get_model_class(hf_config)
    with torch.device(device):
        model = model_class(hf_config, dtype, ops)
    loaded = model.load_weights(iterate_weights(model_dir)) if gguf is None else load_gguf_weights(model, gguf)
    missing = model.expected_weights() - loaded
    if missing:
        names = sorted(m.split("#")[0] for m in missing)
        raise ValueError(f"checkpoint in {model_dir} is missing tensors for: {', '.join(names[:8])}")
    ops.process_weights(model)
    return model.eval()


def load_gguf_weights(model: torch.nn.Module, reader) -> set[str]:
    loaded = model.load_weights(iterate_gguf_weights(reader, model.config, model.expected_weights()))
    freq_factors = rope_freq_factors(reader)
    if freq_factors is not None:
        head_dim = model.model.layers[0].self_attn.head_dim
        model.cos_sin_cache = build_cos_sin_cache(model.config, head_dim, model.cos_sin_cache.device, freq_factors)
    return loaded
