"""Every supported RoPE type gives transformers' cos/sin, on whatever device the model is built."""

import shutil

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from conveyor.gpu_worker.models.llama import LlamaForCausalLM
from conveyor.gpu_worker.models.rotary import SUPPORTED_ROPE_TYPES, build_cos_sin_cache
from conveyor.gpu_worker.ops import TorchOps

from reference import hf_greedy, make_prompts
from test_model_runner import make_runner, run_greedy

THETA = {"rope_theta": 10000.0}
ROPES = {
    "default": {"rope_type": "default"} | THETA,
    "dynamic": {"rope_type": "dynamic", "factor": 2.0} | THETA,
    "linear": {"rope_type": "linear", "factor": 4.0} | THETA,
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256} | THETA,
    "proportional": {"rope_type": "proportional", "partial_rotary_factor": 0.5} | THETA,
    "yarn": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256} | THETA,
}


def config_with(rope: dict, max_position_embeddings: int = 2048) -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, vocab_size=128,
                       max_position_embeddings=max_position_embeddings, rope_parameters=dict(rope))


def test_every_supported_rope_type_is_tested():
    assert sorted(ROPES) == sorted(SUPPORTED_ROPE_TYPES)


@pytest.mark.parametrize("rope_type", sorted(ROPES))
def test_cos_sin_table_matches_transformers(rope_type):
    config = config_with(ROPES[rope_type])
    table = build_cos_sin_cache(config, head_dim=16)
    positions = torch.arange(config.max_position_embeddings)[None]
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions)
    half = table.shape[1] // 2
    torch.testing.assert_close(table[:, :half], cos[0, :, :half])
    torch.testing.assert_close(table[:, half:], sin[0, :, :half])


@pytest.mark.parametrize("rope_type", sorted(ROPES))
def test_model_builds_its_rope_table_on_the_default_device(rope_type):
    with torch.device("meta"):
        model = LlamaForCausalLM(config_with(ROPES[rope_type]), torch.float32, TorchOps())
    assert model.cos_sin_cache.device.type == "meta"


def test_longrope_is_refused_naming_the_supported_types():
    rope = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
            "original_max_position_embeddings": 256} | THETA
    with pytest.raises(ValueError, match="'longrope' is not supported; supported: default, dynamic"):
        build_cos_sin_cache(config_with(rope), head_dim=16)


@pytest.mark.parametrize("rope_type", sorted(ROPES))
def test_greedy_matches_transformers_for_each_rope_type(rope_type, llama_dir, tmp_path):
    model_dir = tmp_path / rope_type
    shutil.copytree(llama_dir, model_dir)
    config = LlamaConfig.from_pretrained(model_dir)
    config.rope_parameters = dict(ROPES[rope_type])
    config.save_pretrained(model_dir)
    prompts = make_prompts(config.vocab_size, lens=(5, 300))  # 300 passes the scalings' 256
    expected = hf_greedy(str(model_dir), prompts, max_tokens=8)
    got = run_greedy(make_runner(str(model_dir)), prompts, max_tokens=8)
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in expected]
