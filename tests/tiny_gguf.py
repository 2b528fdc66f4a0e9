"""Write a tiny Hugging Face model (tools/make_tiny_model.py) as a GGUF file, the way llama.cpp's
convert_hf_to_gguf.py does: its metadata keys, tensor names, q/k row permutation for llama, llama3
rope factors as a `rope_freqs` tensor, and the tokenizer as a gpt2-style vocabulary."""

import json
import math
import pathlib

import gguf
import numpy as np
from safetensors.numpy import load_file

from conveyor.tools.make_tiny_model import SPECIAL_TOKENS

FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
              "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1",
              "Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_M", "Q4_K": "MOSTLY_Q4_K_M", "Q5_K": "MOSTLY_Q5_K_M",
              "Q6_K": "MOSTLY_Q6_K", "TQ1_0": "MOSTLY_TQ1_0"}
# gguf's Python quantizer has no K-quants: their blocks are written from random bytes instead, with
# the block's f16 scales (at these byte offsets) set so each tensor keeps its original spread.
K_QUANT_SCALE_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def write_gguf(model_dir, path, qtype: str = "F32", gguf_arch: str | None = None,
               rope_scaling: dict | None = None) -> pathlib.Path:
    """`gguf_arch` overrides the file's architecture (llama.cpp files Mistral models as llama);
    `rope_scaling` (`type`, `factor`, `original_context_length`) is written as metadata only."""
    model_dir, path = pathlib.Path(model_dir), pathlib.Path(path)
    config = json.loads((model_dir / "config.json").read_text())
    arch = gguf_arch or config["model_type"]
    writer = gguf.GGUFWriter(path, arch)
    _write_config(writer, config, arch, qtype)
    if rope_scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling["type"]))
        writer.add_rope_scaling_factor(rope_scaling["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope_scaling["original_context_length"])
    _write_tokenizer(writer, model_dir)
    arch_enum = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    name_map = gguf.get_tensor_name_map(arch_enum, config["num_hidden_layers"])
    rng = np.random.default_rng(0)
    for hf_name, weight in load_file(model_dir / "model.safetensors").items():
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{name_map.get_name(base)}.{suffix}"
        weight = weight.astype(np.float32)
        if arch == "llama" and ".attn_q." in name:
            weight = _permute(weight, config["num_attention_heads"])
        elif arch == "llama" and ".attn_k." in name:
            weight = _permute(weight, config["num_key_value_heads"])
        _add_tensor(writer, name, weight, qtype if weight.ndim == 2 else "F32", rng)
    if arch == "llama" and (config.get("rope_scaling") or {}).get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_rope_factors(config))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _write_config(writer: gguf.GGUFWriter, config: dict, arch: str, qtype: str) -> None:
    head_dim = config["head_dim"]
    writer.add_name(f"tiny-{arch}")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
        writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[qtype]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_tokenizer(writer: gguf.GGUFWriter, model_dir: pathlib.Path) -> None:
    vocab = json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL for t in tokens])
    gguf.SpecialVocab(model_dir, load_merges=True).add_to_gguf(writer)


def _add_tensor(writer: gguf.GGUFWriter, name: str, weight: np.ndarray, qtype: str, rng) -> None:
    if qtype == "F32":
        writer.add_tensor(name, weight)
        return
    kind = gguf.GGMLQuantizationType[qtype]
    data = _random_k_blocks(weight, kind, rng) if qtype in K_QUANT_SCALE_OFFSETS else gguf.quants.quantize(weight, kind)
    writer.add_tensor(name, data, raw_dtype=kind)


def _random_k_blocks(weight: np.ndarray, kind, rng) -> np.ndarray:
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    rows, cols = weight.shape
    blocks = rng.integers(0, 256, (rows, cols // block_size, block_bytes), dtype=np.uint8)
    offsets = K_QUANT_SCALE_OFFSETS[kind.name]

    def set_scales(value: float) -> None:
        for offset in offsets:
            blocks[..., offset:offset + 2] = np.full(blocks.shape[:2], value, np.float16)[..., None].view(np.uint8)

    set_scales(1.0)
    spread = gguf.quants.dequantize(blocks.reshape(rows, -1), kind).std()
    set_scales(weight.std() / spread)
    return blocks.reshape(rows, -1)


def _permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter: interleave each head's two rotary halves."""
    return (weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _llama3_rope_factors(config: dict) -> np.ndarray:
    """The divisor of each rotary frequency under llama3 scaling, as the converter computes it."""
    scaling, dim = config["rope_scaling"], config["head_dim"]
    factor, old_context = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    factors = []
    for i in range(0, dim, 2):
        wavelength = 2 * math.pi * config["rope_theta"] ** (i / dim)
        if wavelength < old_context / high:
            factors.append(1.0)
        elif wavelength > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)
