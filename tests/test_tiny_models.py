import itertools
import json
import pathlib

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from conveyor.tools.make_tiny_model import make_tiny_model

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM"}
MULTI_BYTE_TEXT = "héllo wörld 你好 🙂\n\tdef f(x): return x ** 2"


def load_model(model_dir) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def random_prompts(count: int, length: int, vocab_size: int) -> torch.Tensor:
    return torch.randint(5, vocab_size, (count, length), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def greedy_with_margins(model, prompts: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy-decode a batch of equal-length prompts; returns tokens and top-1 minus top-2 logit margins."""
    tokens, margins, past, step_input = [], [], None, prompts
    for _ in range(steps):
        out = model(step_input, past_key_values=past, use_cache=True)
        logits, past = out.logits[:, -1], out.past_key_values
        top2 = logits.topk(2).values
        margins.append(top2[:, 0] - top2[:, 1])
        step_input = logits.argmax(-1, keepdim=True)
        tokens.append(step_input)
    return torch.cat(tokens, 1), torch.stack(margins, 1)


@pytest.fixture(scope="module")
def greedy_runs(tiny_models) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    runs = {}
    for arch, model_dir in tiny_models.items():
        model = load_model(model_dir)
        prompts = random_prompts(8, 12, model.config.vocab_size)
        runs[arch] = greedy_with_margins(model, prompts, steps=32)
    return runs


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_model_dir_loads_with_auto_classes(tiny_models, arch):
    model, info = AutoModelForCausalLM.from_pretrained(tiny_models[arch], output_loading_info=True)
    assert not any(info.values()), info  # no tensor missing, unexpected or mismatched
    tokenizer = AutoTokenizer.from_pretrained(tiny_models[arch])
    assert type(model).__name__ == ARCHITECTURES[arch]
    assert model.config.vocab_size == len(tokenizer)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_config_special_token_ids_match_tokenizer(tiny_models, arch):
    config = AutoConfig.from_pretrained(tiny_models[arch])
    tokenizer = AutoTokenizer.from_pretrained(tiny_models[arch])
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)


def test_llama_config_uses_llama3_rope_scaling(tiny_models):
    config = json.loads((pathlib.Path(tiny_models["llama"]) / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "llama3"
    assert config["num_key_value_heads"] < config["num_attention_heads"]


def test_qwen2_has_qkv_biases_and_tied_embeddings(tiny_models):
    model = load_model(tiny_models["qwen2"])
    attention = model.model.layers[0].self_attn
    assert all(proj.bias is not None for proj in (attention.q_proj, attention.k_proj, attention.v_proj))
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_qwen3_has_per_head_qk_norms(tiny_models):
    model = load_model(tiny_models["qwen3"])
    attention = model.model.layers[0].self_attn
    assert attention.q_norm.weight.shape == (model.config.head_dim,)
    assert attention.k_norm.weight.shape == (model.config.head_dim,)
    assert attention.q_proj.bias is None


def test_mistral_sets_a_sliding_window(tiny_models):
    assert AutoConfig.from_pretrained(tiny_models["mistral"]).sliding_window == 4096


def test_tied_checkpoint_has_no_lm_head_tensor(tiny_models):
    with safe_open(pathlib.Path(tiny_models["qwen2"]) / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.weight" in names
    assert "lm_head.weight" not in names


def test_sharded_checkpoint_index_covers_every_tensor(tmp_path):
    model_dir = make_tiny_model(tmp_path, "llama", num_shards=3)
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    stored = {}
    for shard in sorted(model_dir.glob("model-*-of-00003.safetensors")):
        with safe_open(shard, "pt") as f:
            stored |= dict.fromkeys(f.keys(), shard.name)
    assert len(set(stored.values())) == 3
    assert index["weight_map"] == stored


def test_sharded_checkpoint_gives_identical_logits(tmp_path):
    whole = load_model(make_tiny_model(tmp_path / "whole", "qwen3"))
    sharded = load_model(make_tiny_model(tmp_path / "sharded", "qwen3", num_shards=2))
    input_ids = random_prompts(2, 16, whole.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(whole(input_ids).logits, sharded(input_ids).logits)


def test_bfloat16_checkpoint_stores_bfloat16_tensors(tmp_path):
    model_dir = make_tiny_model(tmp_path, "mistral", dtype="bfloat16")
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.bfloat16}
    assert json.loads((model_dir / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_tokenizer_round_trips_multi_byte_text(llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    ids = tokenizer.encode(MULTI_BYTE_TEXT, add_special_tokens=False)
    assert tokenizer.decode(ids) == MULTI_BYTE_TEXT


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_auto_tokenizer_encodes_like_tokenizer_json(tiny_models, arch):
    raw = Tokenizer.from_file(str(pathlib.Path(tiny_models[arch]) / "tokenizer.json"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_models[arch])
    assert tokenizer.encode(MULTI_BYTE_TEXT, add_special_tokens=False) == raw.encode(MULTI_BYTE_TEXT).ids


def test_tokenizer_merges_common_words_into_single_tokens(llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    assert len(tokenizer.encode(" return self", add_special_tokens=False)) == 2


def test_chat_template_renders_roles_and_generation_prompt(llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_chat_role_markers_are_single_special_tokens(llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    assert len(tokenizer.encode("<|im_start|><|im_end|>", add_special_tokens=False)) == 2


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_margins_are_wide(greedy_runs, arch):
    # The smallest of N margins shrinks like median / N for any random model, and float error grows
    # with the logits, so the property is how rarely a step comes near a tie, not one minimum.
    _, margins = greedy_runs[arch]
    assert margins.median() > 1.0
    assert (margins < 1e-2).float().mean() < 0.02


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_generation_is_varied(greedy_runs, arch):
    tokens, _ = greedy_runs[arch]
    longest_run = max(len(list(run)) for row in tokens.tolist() for _, run in itertools.groupby(row))
    assert tokens.unique().numel() > 64
    assert longest_run < 16


def test_same_seed_writes_identical_weights(tmp_path):
    first = make_tiny_model(tmp_path / "a", "qwen2", seed=7)
    second = make_tiny_model(tmp_path / "b", "qwen2", seed=7)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()


def test_unknown_arch_raises_value_error_naming_allowed_ones(tmp_path):
    with pytest.raises(ValueError, match="llama.*mistral.*qwen2.*qwen3"):
        make_tiny_model(tmp_path, "gpt2")
