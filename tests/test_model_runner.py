"""The model runner over the paged cache is token-exact against transformers (float32)."""

import os

import pytest
import torch

from conveyor.config import EngineConfig
from conveyor.sampling_params import SamplingParams
from conveyor.gpu_worker import parallel
from conveyor.gpu_worker.model_runner import ModelRunner
from conveyor.gpu_worker.ops import CpuOps
from conveyor.ipc.messages import CachedRequestData, NewRequestData, SchedulerOutput

from reference import MAX_TOKENS, hf_greedy, make_prompts

def run_greedy(runner: ModelRunner, prompts, max_tokens=MAX_TOKENS, chunk: int | None = None, logprobs=None):
    """A minimal scheduler: every request runs at once, prompts fed `chunk` tokens a step."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs)
    bs = runner.block_size
    next_block = 0
    reqs = {}
    for i, prompt in enumerate(prompts):
        reqs[str(i)] = {"tokens": list(prompt), "computed": 0, "blocks": [], "out": [], "lps": [], "seen": False}
    step_id = 0
    while any(len(r["out"]) < max_tokens for r in reqs.values()):
        new, cached, new_counts, cached_counts = [], CachedRequestData(), [], []
        for rid, r in reqs.items():
            if len(r["out"]) >= max_tokens:
                continue
            remaining = len(r["tokens"]) - r["computed"]
            n = remaining if chunk is None else min(chunk, remaining)
            need = -(-(r["computed"] + n) // bs) - len(r["blocks"])
            added = list(range(next_block, next_block + need))
            next_block += need
            r["blocks"] += added
            if not r["seen"]:
                new.append(NewRequestData(rid, list(r["tokens"]), params, list(r["blocks"]), r["computed"]))
                new_counts.append(n)
                r["seen"] = True
            else:
                cached.request_ids.append(rid)
                cached.new_block_ids.append(added)
                cached.num_computed_tokens.append(r["computed"])
                cached_counts.append(n)
            r["computed"] += n
        with torch.inference_mode():  # as the worker runs it
            out = runner.execute_model(SchedulerOutput(step_id, new, cached, new_counts + cached_counts, []))
        step_id += 1
        for k, (rid, tokens) in enumerate(zip(out.request_ids, out.sampled_token_ids)):
            reqs[rid]["tokens"] += tokens
            reqs[rid]["out"] += tokens
            if out.logprobs:
                reqs[rid]["lps"] += [lp.logprob for lp in out.logprobs[k]]
    return [(reqs[str(i)]["out"], reqs[str(i)]["lps"]) for i in range(len(prompts))]


def make_runner(model_dir: str, block_size: int = 16, dtype: str = "float32", **kwargs) -> ModelRunner:
    config = EngineConfig(model=model_dir, dtype=dtype, block_size=block_size, num_kv_blocks=2048, **kwargs)
    runner = ModelRunner(config, torch.device("cpu"))
    runner.init_kv_cache(config.num_kv_blocks)
    return runner


@pytest.fixture(scope="module")
def references(tiny_models):
    from transformers import AutoConfig

    refs = {}
    for arch, path in tiny_models.items():
        prompts = make_prompts(AutoConfig.from_pretrained(path).vocab_size)
        refs[arch] = (prompts, hf_greedy(path, prompts))
    return refs


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_greedy_matches_transformers(arch, tiny_models, references):
    prompts, expected = references[arch]
    runner = make_runner(tiny_models[arch])
    assert runner.ops.name == "cpu"  # the C kernels
    got = run_greedy(runner, prompts)
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in expected]


@pytest.mark.parametrize("arch", ["qwen3", "mistral"])
def test_plain_torch_ops_match_transformers(arch, tiny_models, references):
    """The fallback where the C kernels cannot be built (q/k norm, sliding window included)."""
    prompts, expected = references[arch]
    runner = make_runner(tiny_models[arch], attention_backend="torch")
    assert runner.ops.name == "torch"
    got = run_greedy(runner, prompts, chunk=7)
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in expected]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_chunked_prefill_of_7_tokens_matches_transformers(arch, tiny_models, references):
    prompts, expected = references[arch]
    got = run_greedy(make_runner(tiny_models[arch]), prompts, chunk=7)
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in expected]


@pytest.mark.parametrize("block_size", [1, 32])
def test_block_size_does_not_change_tokens(block_size, tiny_models, references):
    prompts, expected = references["llama"]
    got = run_greedy(make_runner(tiny_models["llama"], block_size=block_size), prompts)
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in expected]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_chosen_token_logprobs_match_transformers(arch, tiny_models, references):
    prompts, expected = references[arch]
    got = run_greedy(make_runner(tiny_models[arch]), prompts, logprobs=0)
    for (_, lps), (_, ref) in zip(got, expected):
        torch.testing.assert_close(torch.tensor(lps), torch.tensor(ref), atol=1e-4, rtol=0)


def test_missing_tensor_is_named(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tiny_models["llama"]
    for name in os.listdir(src):
        if not name.endswith(".safetensors"):
            os.symlink(os.path.join(src, name), tmp_path / name)
    weights = {}
    for name in os.listdir(src):
        if name.endswith(".safetensors"):
            weights.update(load_file(os.path.join(src, name)))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors.index.json").unlink(missing_ok=True)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        make_runner(str(tmp_path))


def test_wrong_shape_is_named(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tiny_models["llama"]
    for name in os.listdir(src):
        if name != "model.safetensors":
            os.symlink(os.path.join(src, name), tmp_path / name)
    weights = load_file(os.path.join(src, "model.safetensors"))
    weights["model.layers.0.self_attn.k_proj.weight"] = weights["model.layers.0.self_attn.k_proj.weight"][:, :-1].contiguous()
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*shape"):
        make_runner(str(tmp_path))


def test_unsupported_architecture_is_named(tiny_models, tmp_path):
    import json

    src = tiny_models["llama"]
    for name in os.listdir(src):
        if name != "config.json":
            os.symlink(os.path.join(src, name), tmp_path / name)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config["architectures"] = ["GPTNeoXForCausalLM"]
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM"):
        make_runner(str(tmp_path))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_triton_backend_matches_transformers_under_the_interpreter(arch, tiny_models, references):
    """The Triton kernels, wired into the whole model, on CPU tensors via TRITON_INTERPRET=1."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    prompts, expected = references[arch]
    runner = make_runner(tiny_models[arch], attention_backend="triton")
    assert runner.ops.name == "triton"
    got = run_greedy(runner, prompts[:3], max_tokens=4, chunk=7)
    assert [tokens for tokens, _ in got] == [tokens[:4] for tokens, _ in expected[:3]]


def test_triton_runner_applies_penalties_with_the_triton_kernel(tiny_models):
    from conveyor.gpu_worker.triton_ops import TritonOps

    assert make_runner(tiny_models["llama"], attention_backend="triton").sampler.penalties is TritonOps.penalties


ONEDNN_BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()  # AVX-512 BW/VL/DQ or AVX-NE-CONVERT


def test_bf16_linears_are_prepacked_where_onednn_has_bf16_kernels_with_a_gemv_for_small_batches(tiny_models):
    model = make_runner(tiny_models["llama"], dtype="bfloat16").model
    qkv, lm_head = model.model.layers[0].self_attn.qkv_proj, model.lm_head
    assert qkv.packed == ONEDNN_BF16 and (qkv.weight.layout == torch._mkldnn) == ONEDNN_BF16
    assert qkv.upcast != ONEDNN_BF16  # without oneDNN's bf16, larger batches multiply in float32
    assert (lm_head.packed_weight is not None) == ONEDNN_BF16 and lm_head.upcast != ONEDNN_BF16
    assert qkv.gemv is not None and qkv.gemv_max_rows == 4 and qkv.plain_weight.layout == torch.strided
    assert lm_head.gemv is not None


@pytest.mark.parametrize("path", ["onednn", "float32"])
def test_bf16_linears_agree_with_f_linear(path, tiny_models, references, monkeypatch):
    if path == "onednn" and not ONEDNN_BF16:
        pytest.skip("oneDNN has no bf16 kernels on this CPU")
    prompts, _ = references["llama"]
    if path == "float32":  # what a CPU without oneDNN's bf16 runs
        monkeypatch.setattr(parallel, "pack_linear_weight", lambda weight: None)
    fast = make_runner(tiny_models["llama"], dtype="bfloat16")
    assert fast.model.model.layers[0].self_attn.qkv_proj.upcast == (path == "float32")
    monkeypatch.setattr(CpuOps, "process_weights", lambda self, model: None)
    plain = make_runner(tiny_models["llama"], dtype="bfloat16")
    for batch in (prompts, prompts[:1]):  # decode rows through oneDNN or float32, then through the GEMV
        got, expected = run_greedy(fast, batch, logprobs=0), run_greedy(plain, batch, logprobs=0)
        assert [tokens for tokens, _ in got] == [tokens for tokens, _ in expected]
        for (_, a), (_, b) in zip(got, expected):
            # bf16 logits near 50 lie 0.25 apart: summing in another order may round to a neighbour
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=0.25, rtol=0)
