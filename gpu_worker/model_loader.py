"""Builds a model and fills it from (sharded) safetensors or a GGUF file, tensor by tensor, so peak
memory stays near the size of the model itself. With a `quantization`, the linear layers' weights and
the LM head's come quantized (kernels/quant.py): a GGUF file's blocks as they are ("gguf"), or a float
model's quantized at load ("int8", "int4")."""

import json
import logging
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open

from conveyor.gpu_worker.gguf_loader import iterate_gguf_weights, rope_freq_factors
from conveyor.gpu_worker.models import get_model_class
from conveyor.gpu_worker.models.rotary import build_cos_sin_cache
from conveyor.kernels.quant import LOAD_TIME_TYPES, QuantizedWeight, QuantType, quantize

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


def quantized_at_load(weights: Iterator[tuple[str, torch.Tensor]], qtype: QuantType,
                      tie_word_embeddings: bool) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """The linear layers' weights and the LM head's (a tied one is the embedding) as `qtype` blocks."""
    head = "model.embed_tokens.weight" if tie_word_embeddings else "lm_head.weight"
    for name, tensor in weights:
        if name.endswith("_proj.weight") or name == head:
            if tensor.shape[-1] % 32:
                raise ValueError(f"quantization needs rows of whole 32-element blocks, but {name!r} has "
                                 f"{tensor.shape[-1]} columns")
            tensor = quantize(tensor, qtype)
        yield name, tensor


def load_model(model_dir: str, hf_config, dtype: torch.dtype, device: torch.device, ops,
               gguf=None, quantization: str = "none") -> torch.nn.Module:
    """Weights from `gguf` (a GGUFReader of a file in `model_dir`) where given, else safetensors;
    `quantization` is EngineConfig's, resolved ("none", "gguf", "int8" or "int4")."""
    model_class = get_model_class(hf_config)
    with torch.device(device):
        model = model_class(hf_config, dtype, ops)
    if gguf is None:
        weights = iterate_weights(model_dir)
    else:
        weights = iterate_gguf_weights(gguf, model.config, model.expected_weights(), quantization == "gguf")
    if quantization in LOAD_TIME_TYPES:
        weights = quantized_at_load(weights, LOAD_TIME_TYPES[quantization], model.lm_head.tied)
    loaded = model.load_weights(weights)
    if gguf is not None:
        load_rope_freq_factors(model, gguf)
    missing = model.expected_weights() - loaded
    if missing:
        names = sorted(m.split("#")[0] for m in missing)
        raise ValueError(f"checkpoint in {model_dir} is missing tensors for: {', '.join(names[:8])}")
    ops.process_weights(model)
    return model.eval()


def load_rope_freq_factors(model: torch.nn.Module, reader) -> None:
    freq_factors = rope_freq_factors(reader)
    if freq_factors is not None:
        head_dim = model.model.layers[0].self_attn.head_dim
        model.cos_sin_cache = build_cos_sin_cache(model.config, head_dim, model.cos_sin_cache.device, freq_factors)
