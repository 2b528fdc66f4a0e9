"""Weight-only quantized models: the linear layers and the LM head keep their blocks (a GGUF file's,
or a float model's quantized at load) and multiply with them, and give what the model with those
weights dequantized to float32 gives.

The bound: both run in float32 on the same weight values; only the order of the accumulation in
the matmuls differs (blocks of 32 summed apart, then added), which moves a logit by a few float32
ulps of the dot products' partial sums. Through two layers and a log-softmax over the tiny
vocabulary that stays well under 1e-3 on a logprob (measured: about 1e-5), and greedy tokens are
the same.
"""

import pytest
import torch

from conveyor.config import EngineConfig
from conveyor.frontend.llm import LLM
from conveyor.gpu_worker import parallel
from conveyor.gpu_worker.parallel import RowParallelLinear
from conveyor.kernels.quant import QuantizedWeight, QuantType, quantize
from conveyor.sampling_params import SamplingParams
from conveyor.tools.make_tiny_model import make_tiny_model

from reference import dequantized_model, make_prompts
from test_model_runner import make_runner, run_greedy
from tiny_gguf import write_gguf

LOGPROB_TOLERANCE = 1e-3
LENS = (1, 5, 17)
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_models) -> dict[str, str]:
    """The suite's tiny llama without rope scaling, and one wide enough for Q4_K's 256-blocks."""
    root = tmp_path_factory.mktemp("quantized-sources")
    return {"llama": str(make_tiny_model(root / "llama", "llama", scaled_rope=False)),
            "llama-wide": str(make_tiny_model(root / "llama-wide", "llama", hidden_size=256, intermediate_size=512,
                                              scaled_rope=False)),
            "qwen2": tiny_models["qwen2"]}


def greedy_with_logprobs(model: str, **options) -> list[tuple[list[int], list[float]]]:
    runner = make_runner(model, **options)
    return run_greedy(runner, make_prompts(runner.hf_config.vocab_size, lens=LENS), MAX_TOKENS, logprobs=0)


def assert_same_greedy_output(got, expected) -> None:
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in expected]
    for (_, got_logprobs), (_, expected_logprobs) in zip(got, expected):
        assert got_logprobs == pytest.approx(expected_logprobs, abs=LOGPROB_TOLERANCE)


def linear_layers(runner) -> list[torch.nn.Module]:
    return [m for m in runner.model.modules() if isinstance(m, parallel.LinearBase)]


@pytest.mark.parametrize("source,qtype", [("llama", "Q8_0"), ("llama", "Q4_0"), ("llama", "Q4_1"),
                                          ("llama-wide", "Q4_K"), ("qwen2", "Q8_0")])
def test_gguf_blocks_give_what_the_dequantized_file_gives(source, qtype, sources, tmp_path):
    path = str(write_gguf(sources[source], tmp_path / f"{qtype}.gguf", qtype))
    assert_same_greedy_output(greedy_with_logprobs(path, quantization="gguf"),
                              greedy_with_logprobs(path, quantization=None))


@pytest.mark.parametrize("quantization", ["int8", "int4"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # an untied head, and a tied one
def test_load_time_quantization_gives_what_the_dequantized_model_gives(arch, quantization, sources, tmp_path):
    reference = dequantized_model(sources[arch], tmp_path / "dequantized", quantization)
    assert_same_greedy_output(greedy_with_logprobs(sources[arch], quantization=quantization),
                              greedy_with_logprobs(reference))


@pytest.mark.parametrize("quantization,qtype", [("int8", QuantType.Q8_0), ("int4", QuantType.Q4_1)])
def test_load_time_quantization_keeps_every_linear_weight_quantized(quantization, qtype, sources):
    runner = make_runner(sources["qwen2"], quantization=quantization)
    layers = [*linear_layers(runner), runner.model.lm_head]
    assert all(isinstance(m.qweight, QuantizedWeight) and m.qweight.qtype == qtype for m in layers)
    assert all(m.weight.numel() == 0 for m in linear_layers(runner))  # no float copy beside the blocks


def test_a_quantized_gguf_file_keeps_its_blocks_by_default(sources, tmp_path):
    path = str(write_gguf(sources["llama"], tmp_path / "q4_1.gguf", "Q4_1"))
    quantized, dequantized = make_runner(path), make_runner(path, quantization=None)
    assert all(m.qweight.qtype == QuantType.Q4_1 for m in linear_layers(quantized))
    assert all(m.qweight is None for m in linear_layers(dequantized))

    def parameter_bytes(runner) -> int:
        floats = sum(p.numel() * p.element_size() for p in runner.model.parameters())
        blocks = sum(m.qweight.nbytes for m in [*linear_layers(runner), runner.model.lm_head] if m.qweight is not None)
        return floats + blocks

    # float32 values: 4 bytes a weight; Q4_1: 20 bytes a block of 32
    assert parameter_bytes(quantized) < parameter_bytes(dequantized) / 2


def test_tensor_parallel_quantized_file_gives_what_one_rank_gives(sources, tmp_path):
    path = write_gguf(sources["llama"], tmp_path / "model.gguf", "Q4_1")
    prompts = make_prompts(make_runner(str(path)).hf_config.vocab_size, lens=LENS)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
    with LLM(str(path), dtype="float32", num_kv_blocks=64, tensor_parallel_size=2) as llm:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    got = [(list(o.outputs[0].token_ids), [lps[t].logprob for t, lps in zip(o.outputs[0].token_ids,
                                                                           o.outputs[0].logprobs)])
           for o in outputs]
    assert_same_greedy_output(got, greedy_with_logprobs(str(path)))


def test_tensor_parallel_size_must_split_whole_blocks():
    weight = quantize(torch.randn(8, 64), QuantType.Q8_0)  # two 32-blocks a row
    parallel.init_tensor_parallel(0, 4)
    try:
        layer = RowParallelLinear(64, 8, bias=False, dtype=torch.float32)
        with pytest.raises(ValueError, match=r"tensor_parallel_size \(4\) must split the 64 input columns of "
                                             r"'o_proj.weight' into whole Q8_0 blocks of 32, got 16 columns a rank"):
            layer.load_weight(layer.weight, weight, 0, "o_proj.weight")
    finally:
        parallel.init_tensor_parallel(0, 1)


def test_gguf_quantization_needs_a_gguf_file(sources):
    with pytest.raises(ValueError, match="quantization must be none, int8 or int4 for a Hugging Face model"):
        EngineConfig(model=sources["llama"], quantization="gguf")


def test_an_unknown_quantization_is_named(sources):
    with pytest.raises(ValueError, match="quantization must be auto, none, gguf, int8 or int4, got 'fp8'"):
        EngineConfig(model=sources["llama"], quantization="fp8")


def test_cpu_kv_cache_defaults_to_what_every_sequence_at_its_longest_needs(sources):
    runner = make_runner(sources["llama"], max_num_seqs=3, max_model_len=100)
    runner.config.num_kv_blocks = None
    assert runner.determine_num_blocks() == 3 * 7  # 100 tokens: 7 blocks of 16
