"""Write small, randomly initialised Hugging Face checkpoints for tests and benchmarks.

`make_tiny_model(out_dir, "qwen3")` writes a complete model directory (config, safetensors weights,
byte-level BPE tokenizer with a ChatML template, generation config) that `AutoModelForCausalLM` and
`AutoTokenizer` load offline. The benchmark shape is a preset:
`make_tiny_model(out_dir, "llama", **SMOLLM2_135M)`, or `--preset smollm2-135m` on the command line.
"""

import argparse
import functools
import json
import math
import os
import pathlib
import sysconfig
from dataclasses import dataclass

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (GenerationConfig, LlamaConfig, MistralConfig, PretrainedConfig, PreTrainedTokenizerFast,
                          Qwen2Config, Qwen3Config)

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, IM_START, IM_END)
# ChatML; tools render as Qwen2.5's do (Hermes style): a system turn listing them, calls as <tool_call> JSON
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n# Tools\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\nCall a function as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
    "{%- for call in message.get('tool_calls') or [] %}"
    "{{- '<tool_call>' + ({'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson)"
    " + '</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Qwen2's split: transformers 5 rebuilds every qwen2 tokenizer with it, so all archs use it to agree.
PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                     r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
DEFAULT_VOCAB_SIZE = 1024
EMBED_STD = 0.02
LOGIT_STD = 16.0
LLAMA3_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
SMOLLM2_135M = dict(num_layers=30, hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3,
                    head_dim=64, vocab_size=49152, max_position_embeddings=8192, dtype="bfloat16",
                    tie_word_embeddings=True, rope_theta=100000.0, scaled_rope=False)
PRESETS = {"smollm2-135m": ("llama", SMOLLM2_135M)}


@dataclass(frozen=True, slots=True)
class ArchSpec:
    config_class: type[PretrainedConfig]
    architecture: str
    rope_theta: float
    tie_word_embeddings: bool
    qkv_bias: bool = False
    qk_norm: bool = False
    extra: tuple[tuple[str, object], ...] = ()


ARCHS = {
    "llama": ArchSpec(LlamaConfig, "LlamaForCausalLM", 500000.0, False),
    "qwen2": ArchSpec(Qwen2Config, "Qwen2ForCausalLM", 1000000.0, True, qkv_bias=True),
    "qwen3": ArchSpec(Qwen3Config, "Qwen3ForCausalLM", 1000000.0, False, qk_norm=True),
    "mistral": ArchSpec(MistralConfig, "MistralForCausalLM", 1000000.0, False, extra=(("sliding_window", 4096),)),
}


def make_tiny_model(out_dir: str | os.PathLike, arch: str, *, num_layers: int = 2, hidden_size: int = 64,
                    intermediate_size: int = 128, num_heads: int = 4, num_kv_heads: int = 2,
                    head_dim: int | None = None, vocab_size: int | None = None,
                    max_position_embeddings: int = 2048, dtype: str = "float32", num_shards: int = 1,
                    seed: int = 0, tie_word_embeddings: bool | None = None, rope_theta: float | None = None,
                    scaled_rope: bool = True) -> pathlib.Path:
    """Write a random-weight checkpoint of `arch` to `out_dir` and return its path.

    `vocab_size` also sizes the trained tokenizer (default 1024); rows past what the corpus yields stay
    unused, as in padded Hub vocabularies. `scaled_rope` gives llama its llama3
    rope scaling; other archs have none. `tie_word_embeddings=None` takes the arch's usual choice.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    spec = ARCHS[arch]
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _tokenizer(vocab_size or DEFAULT_VOCAB_SIZE)
    vocab_size = vocab_size or len(tokenizer)
    if len(tokenizer) > vocab_size:
        raise ValueError(f"vocab_size must be >= {len(tokenizer)} (the tokenizer's size), got {vocab_size}")
    tie = spec.tie_word_embeddings if tie_word_embeddings is None else tie_word_embeddings
    rope = {"rope_type": "default", "rope_theta": rope_theta or spec.rope_theta}
    if arch == "llama" and scaled_rope:
        rope |= LLAMA3_ROPE_SCALING
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           (("bos_token_id", BOS), ("eos_token_id", EOS), ("pad_token_id", PAD))}
    config = spec.config_class(
        architectures=[spec.architecture], vocab_size=vocab_size, hidden_size=hidden_size,
        intermediate_size=intermediate_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, head_dim=head_dim or hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie, rope_parameters=rope,
        dtype=dtype, **dict(spec.extra), **ids)

    weights = _init_weights(_tensor_shapes(config, spec, tie), tie, hidden_size, torch.Generator().manual_seed(seed))
    state = {name: t.to(getattr(torch, dtype)) for name, t in weights.items()}

    config.save_pretrained(out)
    _add_legacy_config_keys(out / "config.json")
    GenerationConfig(**ids).save_pretrained(out)
    _save_tokenizer(tokenizer, out)
    _save_weights(state, out, num_shards)
    return out


def _tensor_shapes(config: PretrainedConfig, spec: ArchSpec, tie: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, named and shaped as transformers' model class has it (built
    here rather than by instantiating that class, which imports torch._dynamo and with it Triton)."""
    hidden, inter, head_dim = config.hidden_size, config.intermediate_size, config.head_dim
    q_size, kv_size = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden)}
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        for name, rows in (("q_proj", q_size), ("k_proj", kv_size), ("v_proj", kv_size)):
            shapes[f"{layer}self_attn.{name}.weight"] = (rows, hidden)
            if spec.qkv_bias:
                shapes[f"{layer}self_attn.{name}.bias"] = (rows,)
        shapes[f"{layer}self_attn.o_proj.weight"] = (hidden, q_size)
        if spec.qk_norm:
            shapes[f"{layer}self_attn.q_norm.weight"] = (head_dim,)
            shapes[f"{layer}self_attn.k_norm.weight"] = (head_dim,)
        shapes[f"{layer}mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{layer}mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{layer}mlp.down_proj.weight"] = (hidden, inter)
        shapes[f"{layer}input_layernorm.weight"] = (hidden,)
        shapes[f"{layer}post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    if not tie:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def _init_weights(shapes: dict[str, tuple[int, ...]], tie: bool, hidden: int,
                  generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights whose greedy choices win by wide margins and whose output uses every tensor.

    Logits spread with std ~LOGIT_STD. Embeddings are small next to what the layers add, so a tied
    head does not keep echoing the current token. Norm gains are random, so a loader that drops
    them produces different tokens; queries are scaled up so attention is selective.
    """
    weights = {}
    for name, shape in shapes.items():
        p = weights[name] = torch.empty(shape)
        fan_in = shape[-1]
        if name.endswith("embed_tokens.weight"):
            p.normal_(0.0, EMBED_STD, generator=generator)
        elif name == "lm_head.weight":
            p.normal_(0.0, LOGIT_STD / math.sqrt(fan_in), generator=generator)
        elif name.endswith("norm.weight"):
            p.uniform_(0.5, 1.5, generator=generator)
            if tie and name == "model.norm.weight":
                p.mul_(LOGIT_STD / (EMBED_STD * math.sqrt(hidden)))
        elif name.endswith(".bias"):
            p.normal_(0.0, 0.1, generator=generator)
        elif name.endswith("q_proj.weight"):
            p.normal_(0.0, 2.0 / math.sqrt(fan_in), generator=generator)
        else:
            p.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)
    return weights


def _add_legacy_config_keys(path: pathlib.Path) -> None:
    """Also spell rope and dtype the way most Hub checkpoints do (`rope_theta`, `rope_scaling`, `torch_dtype`)."""
    config = json.loads(path.read_text())
    rope = dict(config["rope_parameters"])
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope if rope["rope_type"] != "default" else None
    config["torch_dtype"] = config["dtype"]
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _save_weights(state: dict[str, torch.Tensor], out: pathlib.Path, num_shards: int) -> None:
    if num_shards == 1:
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
        return
    names = list(state)
    if num_shards > len(names):
        raise ValueError(f"num_shards must be <= {len(names)} (the number of tensors), got {num_shards}")
    sizes = {name: t.numel() * t.element_size() for name, t in state.items()}
    total = sum(sizes.values())
    shards: list[list[str]] = [[]]
    written = 0
    for i, name in enumerate(names):
        shards_left, names_left = num_shards - len(shards), len(names) - i
        if shards[-1] and shards_left and (written >= total * len(shards) / num_shards or names_left == shards_left):
            shards.append([])
        shards[-1].append(name)
        written += sizes[name]
    weight_map = {}
    for i, shard_names in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({n: state[n] for n in shard_names}, out / filename, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard_names, filename)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _save_tokenizer(tokenizer: PreTrainedTokenizerFast, out: pathlib.Path) -> None:
    """Save, then restate template and special tokens where transformers 4 looks for them.

    `unk_token: null` keeps transformers 5, which rebuilds any qwen2 tokenizer as `Qwen2Tokenizer`,
    from adding an `<|endoftext|>` token the model has no row for.
    """
    tokenizer.save_pretrained(out)
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config |= {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE,
               "additional_special_tokens": [IM_START, IM_END], "unk_token": None}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "additional_special_tokens": [IM_START, IM_END]}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


@functools.lru_cache(maxsize=4)
def _trained_tokenizer_json(vocab_size: int) -> str:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_stdlib_corpus(max(1 << 20, 256 * vocab_size)), trainer)
    return tokenizer.to_str()


def _tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(vocab_size)),
        bos_token=BOS, eos_token=EOS, pad_token=PAD, additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE, model_max_length=1 << 30, clean_up_tokenization_spaces=False)


def _stdlib_corpus(max_bytes: int) -> list[str]:
    """Python's own standard-library sources: on every machine, fixed for a given Python version."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skipped = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"}
    texts, size = [], 0
    for path in sorted(root.rglob("*.py")):
        if size >= max_bytes:
            break
        if skipped.isdisjoint(path.relative_to(root).parts):
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
            size += len(texts[-1])
    return texts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--arch", choices=sorted(ARCHS))
    parser.add_argument("--preset", choices=sorted(PRESETS))
    parser.add_argument("--num-layers", type=int)
    parser.add_argument("--hidden-size", type=int)
    parser.add_argument("--intermediate-size", type=int)
    parser.add_argument("--num-heads", type=int)
    parser.add_argument("--num-kv-heads", type=int)
    parser.add_argument("--head-dim", type=int)
    parser.add_argument("--vocab-size", type=int)
    parser.add_argument("--max-position-embeddings", type=int)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--num-shards", type=int)
    parser.add_argument("--seed", type=int)
    args = vars(parser.parse_args(argv))
    out_dir, arch, preset = args.pop("out_dir"), args.pop("arch"), args.pop("preset")
    preset_arch, kwargs = PRESETS[preset] if preset else (None, {})
    arch = arch or preset_arch
    if arch is None:
        parser.error("one of --arch or --preset is required")
    kwargs = kwargs | {key: value for key, value in args.items() if value is not None}
    print(make_tiny_model(out_dir, arch, **kwargs))


if __name__ == "__main__":
    main()
