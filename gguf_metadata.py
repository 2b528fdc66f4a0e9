"""A transformers config built from a llama.cpp GGUF file's metadata, read with the `gguf` package.

The keys are those llama.cpp's converter writes (`{arch}.embedding_length`, ...). The config is built
here rather than by transformers' GGUF import, which leaves out head_dim (`attention.key_length`) and
rope scaling; the tokenizer does come from transformers (see EngineConfig.load_tokenizer).
"""

import functools

# GGUF architecture -> the Hugging Face architecture Conveyor runs it as. llama.cpp files Mistral
# models under "llama".
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def gguf_architecture(reader) -> str:
    arch = field_value(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: "
                         f"{', '.join(sorted(ARCHITECTURES))} (llama covers Llama and Mistral)")
    return arch


def field_value(reader, key: str, default=None):
    field = reader.get_field(key)
    return default if field is None else field.contents()


def open_gguf(path: str):
    """A GGUFReader of the file (the tensors are mapped, not read): its metadata, vocabulary
    included, is parsed here, which takes seconds for a large vocabulary."""
    from gguf import GGUFReader

    return GGUFReader(path)


@functools.lru_cache(maxsize=4)
def read_hf_config(path: str):
    return hf_config_of(open_gguf(path))


def hf_config_of(reader):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    arch = gguf_architecture(reader)

    def value(key, default=None):
        return field_value(reader, f"{arch}.{key}", default)

    tensors = {t.name: t for t in reader.tensors}
    hidden, heads = value("embedding_length"), value("attention.head_count")
    rope = {"rope_type": "default", "rope_theta": value("rope.freq_base", 10000.0)}
    scaling = value("rope.scaling.type", "none")
    if scaling == "linear":
        rope |= {"rope_type": "linear", "factor": value("rope.scaling.factor")}
    elif scaling == "yarn":
        rope |= {"rope_type": "yarn", "factor": value("rope.scaling.factor"),
                 "original_max_position_embeddings": value("rope.scaling.original_context_length")}
    elif scaling != "none":
        raise ValueError(f"GGUF rope scaling {scaling!r} is not supported; supported: none, linear, yarn")
    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
    config = config_class(
        architectures=[ARCHITECTURES[arch]],
        vocab_size=int(tensors["token_embd.weight"].shape[1]),
        hidden_size=hidden,
        intermediate_size=value("feed_forward_length"),
        num_hidden_layers=value("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=value("attention.head_count_kv", heads),
        head_dim=value("attention.key_length", hidden // heads),
        max_position_embeddings=value("context_length"),
        rms_norm_eps=value("attention.layer_norm_rms_epsilon"),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=field_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=field_value(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=field_value(reader, "tokenizer.ggml.padding_token_id"),
        rope_scaling=rope if rope["rope_type"] != "default" else None,
        rope_theta=rope["rope_theta"],
        **({"attention_bias": "blk.0.attn_q.bias" in tensors} if arch == "llama" else {}),
    )
    config.dtype = gguf_dtype(reader)
    return config


def gguf_dtype(reader) -> str:
    """The dtype a `dtype="auto"` engine runs the file in: the file's own for a float file, bfloat16
    for a quantized one (its weights dequantize to it)."""
    from gguf import LlamaFileType

    file_type = field_value(reader, "general.file_type")
    return {LlamaFileType.ALL_F32: "float32", LlamaFileType.MOSTLY_F16: "float16"}.get(file_type, "bfloat16")
