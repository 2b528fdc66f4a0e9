"""LoRA adapters: several in one batch with the base model, each request's tokens those of peft's
own forward over transformers (float32, greedy); the workers' adapter cache and its evictions;
the seed's id-only requests; the prefix cache kept apart per adapter; adapters checked at the door."""

import json
from types import SimpleNamespace

import httpx
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig

from conveyor import LLM, AsyncLLM, LoRARequest, SamplingParams
from conveyor.config import EngineConfig
from conveyor.engine_core.lora_cache import LoRACache
from conveyor.frontend.api_server import build_app
from conveyor.lora import CONFIG_FILE, WEIGHTS_FILE, check_adapter
from reference import load_reference, make_lora_adapter, make_prompts

MAX_TOKENS = 8
LOGPROB_TOLERANCE = 1e-4
# name -> (rank, targets, alpha, rslora): ranks, targets and scalings all differ
ADAPTERS = {
    "all": (8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 16, False),
    "qv-rslora": (4, ["q_proj", "v_proj"], 8, True),
    "mlp": (16, ["o_proj", "gate_proj", "down_proj"], 32, False),
}
IDS = {name: i + 1 for i, name in enumerate(ADAPTERS)}
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def adapters(llama_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_lora_adapter(llama_dir, root / name, rank, targets, seed=IDS[name], alpha=alpha,
                                    use_rslora=rslora)
            for name, (rank, targets, alpha, rslora) in ADAPTERS.items()}


@pytest.fixture(scope="module")
def prompts(llama_dir) -> list[list[int]]:
    return make_prompts(AutoConfig.from_pretrained(llama_dir).vocab_size, lens=(3, 20, 41, 7), seed=3)


@pytest.fixture(scope="module")
def peft_models(llama_dir, adapters) -> dict:
    """adapter name (None: the base model) -> transformers' model, under peft's adapter."""
    return {name: load_reference(llama_dir, adapters.get(name)) for name in [None, *ADAPTERS]}


def lora(name: str | None, adapters) -> LoRARequest | None:
    return None if name is None else LoRARequest(name, IDS[name], adapters[name])


def assert_peft_greedy(output, model, prompt: list[int]) -> None:
    """Each token the engine chose is peft's greedy choice after the prompt and the tokens before it,
    with its logprob: one forward over the whole sequence decides."""
    completion = output.outputs[0]
    tokens = completion.token_ids
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float()
    logprobs = torch.log_softmax(logits, -1)
    assert tokens == logprobs.argmax(-1).tolist()
    got = [lps[t].logprob for t, lps in zip(tokens, completion.logprobs)]
    assert got == pytest.approx(logprobs.gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist(),
                                abs=LOGPROB_TOLERANCE)


def generate(llm, prompt: list[int], name: str | None, adapters):
    return llm.generate([prompt], GREEDY, use_tqdm=False, lora_request=lora(name, adapters))[0]


@pytest.fixture(scope="module")
def llm(llama_dir):
    with LLM(llama_dir, dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=16, num_kv_blocks=256,
             max_model_len=128) as llm:
        yield llm


def test_adapters_mixed_in_one_batch_with_the_base_model_equal_peft(llm, adapters, prompts, peft_models):
    names = [None, *ADAPTERS]
    plan = [(p, names[(p + k) % len(names)]) for p in range(len(prompts)) for k in range(2)]
    outputs = llm.generate([prompts[p] for p, _ in plan], GREEDY, use_tqdm=False,
                           lora_request=[lora(name, adapters) for _, name in plan])
    for (p, name), output in zip(plan, outputs):
        assert_peft_greedy(output, peft_models[name], prompts[p])
    adapted = [(p, o.outputs[0].token_ids) for (p, name), o in zip(plan, outputs) if name is not None]
    base = llm.generate([prompts[p] for p, _ in adapted], GREEDY, use_tqdm=False)
    assert sum(tokens != b.outputs[0].token_ids for (_, tokens), b in zip(adapted, base)) >= 4  # adapters matter


def test_prefix_cache_is_shared_within_an_adapter_and_never_across(llm, adapters, prompts, peft_models):
    prompt = [5] + prompts[2]  # 42 tokens: two full blocks to share, which no other test sends
    first, other, base, again = (generate(llm, prompt, name, adapters) for name in ("mlp", "all", None, "mlp"))
    assert first.num_cached_tokens == other.num_cached_tokens == base.num_cached_tokens == 0
    assert again.num_cached_tokens == 32
    for name, output in (("mlp", first), ("all", other), (None, base), ("mlp", again)):
        assert_peft_greedy(output, peft_models[name], prompt)


def test_adapter_given_in_memory_then_named_by_id_alone(llm, adapters, prompts, peft_models):
    from safetensors.torch import load_file

    path = adapters["qv-rslora"]
    with open(f"{path}/{CONFIG_FILE}") as f:
        config = json.load(f)
    weights = load_file(f"{path}/{WEIGHTS_FILE}")
    sent = LoRARequest("in-memory", 40, lora_weights=weights, lora_config=config)
    first = llm.generate([prompts[1]], GREEDY, use_tqdm=False, lora_request=sent)[0]
    later = llm.generate([prompts[3]], GREEDY, use_tqdm=False, lora_request=LoRARequest("in-memory", 40))[0]
    assert_peft_greedy(first, peft_models["qv-rslora"], prompts[1])
    assert_peft_greedy(later, peft_models["qv-rslora"], prompts[3])


def test_evicted_adapters_reload_exactly_and_an_id_alone_then_fails(llm, adapters, prompts, peft_models):
    # the workers keep max_cpu_loras = 2 adapters: after these three, "all" is the one evicted
    for name in ("all", "qv-rslora", "mlp"):
        assert_peft_greedy(generate(llm, prompts[0], name, adapters), peft_models[name], prompts[0])
    loads = llm.engine.client.call("stats").result(timeout=10)["num_lora_loads"]
    reloaded = generate(llm, prompts[0], "all", adapters)  # evicts "qv-rslora"
    loads_after = llm.engine.client.call("stats").result(timeout=10)["num_lora_loads"]
    held = llm.generate([prompts[0]], GREEDY, use_tqdm=False, lora_request=LoRARequest("x", IDS["mlp"]))[0]
    evicted = llm.generate([prompts[0]], GREEDY, use_tqdm=False,
                           lora_request=LoRARequest("x", IDS["qv-rslora"]))[0]
    assert_peft_greedy(reloaded, peft_models["all"], prompts[0])
    assert loads_after == loads + 1
    assert_peft_greedy(held, peft_models["mlp"], prompts[0])
    assert evicted.outputs[0].finish_reason == "error"
    assert f"LoRA adapter {IDS['qv-rslora']} is not loaded" in evicted.error_message


def test_triton_kernels_apply_adapters_under_the_interpreter(llama_dir, adapters, prompts, peft_models):
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, logprobs=0)
    with LLM(llama_dir, dtype="float32", attention_backend="triton", enable_lora=True, max_loras=2,
             num_kv_blocks=16, max_model_len=64) as llm:
        plan = [(0, "all"), (3, "qv-rslora"), (0, None)]  # two adapters' rows gathered, one step
        outputs = llm.generate([prompts[p] for p, _ in plan], params, use_tqdm=False,
                               lora_request=[lora(name, adapters) for _, name in plan])
    for (p, name), output in zip(plan, outputs):
        assert_peft_greedy(output, peft_models[name], prompts[p])


def test_lora_cache_evicts_the_least_recently_used_adapter_outside_the_step():
    cache = LoRACache(capacity=2)
    assert cache.prepare({1: "/a"}) == ([], {1: "/a"})
    assert cache.prepare({2: "/b"}) == ([], {2: "/b"})
    assert cache.prepare({1: "/a"}) == ([], {})
    assert cache.prepare({3: "/c", 1: "/a"}) == ([2], {3: "/c"})
    assert cache.num_loads == 3


def test_an_id_names_one_adapter():
    cache = LoRACache(capacity=2)
    assert cache.resolve(1, "/a", pending=False) == ("/a", None)
    path, error = cache.resolve(1, "/b", pending=False)
    assert path is None and "lora_id 1 names the adapter at /a" in error
    assert cache.resolve(1, None, pending=True) == ("/a", None)  # a waiting request brought it
    path, error = cache.resolve(1, None, pending=False)
    assert path is None and "send it again" in error


def write_adapter(path, config: dict, tensors: dict) -> str:
    path.mkdir()
    (path / CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **config}))
    save_file(tensors, str(path / WEIGHTS_FILE))
    return str(path)


def test_lm_head_and_embedding_targets_are_refused(llama_dir, tmp_path):
    hf_config = AutoConfig.from_pretrained(llama_dir)
    head = write_adapter(tmp_path / "head", {"target_modules": ["lm_head"]}, {
        "base_model.model.lm_head.lora_A.weight": torch.zeros(2, 64),
        "base_model.model.lm_head.lora_B.weight": torch.zeros(hf_config.vocab_size, 2)})
    with pytest.raises(ValueError, match="target_modules may name only .* got 'lm_head'"):
        check_adapter(head, hf_config, 16)
    embed = write_adapter(tmp_path / "embed", {}, {
        "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(2, hf_config.vocab_size)})
    with pytest.raises(ValueError, match="is not a LoRA pair of a q_proj/.* projection"):
        check_adapter(embed, hf_config, 16)


def test_adapter_beyond_max_lora_rank_or_of_the_wrong_shape_is_refused(llama_dir, adapters, tmp_path):
    hf_config = AutoConfig.from_pretrained(llama_dir)
    with pytest.raises(ValueError, match="rank 16 exceeds max_lora_rank \\(8\\)"):
        check_adapter(adapters["mlp"], hf_config, 8)
    wrong = write_adapter(tmp_path / "wrong", {}, {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 2)})
    with pytest.raises(ValueError, match="has shape \\(2, 32\\), expected \\(2, 64\\)"):
        check_adapter(wrong, hf_config, 16)


def test_a_lora_request_needs_an_engine_with_enable_lora(llama_dir, adapters):
    frontend = SimpleNamespace(config=EngineConfig(model=llama_dir))  # what resolve_lora reads of AsyncLLM
    with pytest.raises(ValueError, match="lora_request needs an engine started with enable_lora=True"):
        AsyncLLM.resolve_lora(frontend, lora("all", adapters))


async def test_server_serves_adapters_under_their_names(llm, adapters, prompts):
    modules = [LoRARequest("all", IDS["all"], adapters["all"]), LoRARequest("mlp", IDS["mlp"], adapters["mlp"])]
    app = build_app(llm.engine, "tiny", lora_modules=modules)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60) as http:
        cards = (await http.get("/v1/models")).json()["data"]
        body = {"prompt": prompts[1], "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}
        served = {name: (await http.post("/v1/completions", json={**body, "model": name})).json()
                  for name in ("tiny", "mlp")}
        unknown = await http.post("/v1/completions", json={**body, "model": "qv-rslora"})
    assert [(c["id"], c["root"], c["parent"]) for c in cards] == [
        ("tiny", llm.engine.config.model, None), ("all", adapters["all"], "tiny"), ("mlp", adapters["mlp"], "tiny")]
    direct = llm.generate([prompts[1]], GREEDY, use_tqdm=False, lora_request=modules[1])[0]
    assert served["mlp"]["model"] == "mlp" and served["tiny"]["model"] == "tiny"
    assert served["mlp"]["choices"][0]["text"] == direct.outputs[0].text
    assert served["tiny"]["choices"][0]["text"] != direct.outputs[0].text
    assert unknown.status_code == 404


async def test_server_loads_and_unloads_adapters_at_run_time_only_when_allowed(llm, adapters, prompts):
    body = {"prompt": prompts[0], "max_tokens": 2, "temperature": 0.0, "model": "late"}
    load = {"lora_name": "late", "lora_path": adapters["qv-rslora"]}
    fixed = build_app(llm.engine, "tiny")
    app = build_app(llm.engine, "tiny", allow_lora_updates=True)
    async with (httpx.AsyncClient(transport=httpx.ASGITransport(app=fixed), base_url="http://t") as off,
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as on):
        assert (await off.post("/v1/load_lora_adapter", json=load)).status_code == 404
        assert (await on.post("/v1/completions", json=body)).status_code == 404
        assert (await on.post("/v1/load_lora_adapter", json=load)).status_code == 200
        assert (await on.post("/v1/load_lora_adapter", json=load)).status_code == 400  # the name is taken
        bad = await on.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": "/nonexistent"})
        served = await on.post("/v1/completions", json=body)
        assert (await on.post("/v1/unload_lora_adapter", json={"lora_name": "late"})).status_code == 200
        gone = await on.post("/v1/completions", json=body)
    assert bad.status_code == 400 and "adapter_config.json" in bad.json()["error"]["message"]
    assert served.status_code == 200 and served.json()["model"] == "late"
    assert gone.status_code == 404
