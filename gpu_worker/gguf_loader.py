"""Weights from a llama.cpp GGUF file, named as the Hugging Face checkpoint names them and put back
in their row order, one tensor at a time: a matrix of a type the quantized kernels take as its
blocks (a QuantizedWeight), where asked, and every other tensor dequantized with the `gguf` package."""

from collections.abc import Iterator

import numpy as np
import torch

from conveyor.gguf_metadata import gguf_architecture
from conveyor.kernels.quant import QuantizedWeight, QuantType

# Every type is dequantized to the engine's dtype at load, but those of QuantType where kept.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")
# llama3 rope scaling, as llama.cpp's converter writes it: one divisor per rotary frequency.
ROPE_FREQS = "rope_freqs.weight"


def gguf_names(reader, hf_names: set[str], num_layers: int) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face checkpoint name, for the tensors `hf_names` lists."""
    import gguf

    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == gguf_architecture(reader))
    name_map = gguf.get_tensor_name_map(arch, num_layers)
    names = {}
    for hf_name in hf_names:
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = name_map.get_name(base)
        if gguf_name is not None:
            names[f"{gguf_name}.{suffix}"] = hf_name
    return names


def iterate_gguf_weights(reader, hf_config, hf_names: set[str],
                         keep_quantized: bool = False) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """(Hugging Face name, float32 tensor) for every tensor of the file but ROPE_FREQS; with
    `keep_quantized`, (name, QuantizedWeight) for a matrix of a QuantType."""
    from gguf import dequantize

    names = gguf_names(reader, hf_names, hf_config.num_hidden_layers)
    unpermute = gguf_architecture(reader) == "llama"
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS:
            continue
        if tensor.tensor_type.name not in SUPPORTED_TYPES:
            raise ValueError(f"GGUF tensor {tensor.name!r} has type {tensor.tensor_type.name}; supported: "
                             f"{', '.join(SUPPORTED_TYPES)}")
        if tensor.name not in names:
            raise ValueError(f"GGUF tensor {tensor.name!r} matches no parameter of {hf_config.architectures[0]}")
        quantized = keep_quantized and tensor.tensor_type.name in QuantType.__members__ and len(tensor.shape) == 2
        if quantized:  # rows of blocks, copied out of the mapped file
            weight = torch.from_numpy(np.array(tensor.data, np.uint8))
        else:
            weight = torch.from_numpy(writable_f32(dequantize(tensor.data, tensor.tensor_type)))
        if unpermute and ".attn_q." in tensor.name:
            weight = unpermute_rows(weight, hf_config.num_attention_heads)
        elif unpermute and ".attn_k." in tensor.name:
            weight = unpermute_rows(weight, hf_config.num_key_value_heads)
        if quantized:
            n, k = int(tensor.shape[1]), int(tensor.shape[0])
            weight = QuantizedWeight(weight.contiguous(), QuantType[tensor.tensor_type.name], (n, k))
        yield names[tensor.name], weight


def unpermute_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's permutation of llama's q/k rows: it interleaves each head's two rotary
    halves (GGML's rope pairs adjacent rows), where Hugging Face's rope pairs row i with i + d/2.
    Rows of quantized blocks move as the rows of values do."""
    head_dim = weight.shape[0] // num_heads
    rows = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
    return rows.transpose(1, 2).reshape(weight.shape)


def rope_freq_factors(reader) -> torch.Tensor | None:
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS:
            return torch.from_numpy(writable_f32(tensor.data))
    return None


def writable_f32(array: np.ndarray) -> np.ndarray:
    """A copy only where needed: float tensors come as read-only views of the mapped file."""
    return np.require(array, np.float32, ["C_CONTIGUOUS", "WRITEABLE"])
