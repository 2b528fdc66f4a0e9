"""Requests built to hurt: values past what the engine's tensors and msgpack hold, fan-outs past
the request limits, logits processors that are not allowed or that raise. Each fails alone, as a
ValueError (a 400 over HTTP) naming the field, and the engine serves on."""

import asyncio
import os
from types import SimpleNamespace

import httpx
import pytest

from conveyor import AsyncLLM, SamplingParams
from conveyor.config import RequestLimits
from conveyor.frontend.api_server import build_app
from conveyor.frontend.errors import EngineDeadError
from idle import wait_idle

MODEL = "tiny-llama"
PROCESSORS = ["user_logits_processors:only_token_42", "user_logits_processors:fail_on_third_token"]
PROMPT = {"prompt_token_ids": list(range(5, 25))}


@pytest.fixture(scope="module")
def engine(llama_dir):
    tests_dir = os.path.dirname(__file__)
    with pytest.MonkeyPatch.context() as patch:  # the workers import the processors from here
        patch.setenv("PYTHONPATH", tests_dir + os.pathsep + os.environ.get("PYTHONPATH", ""))
        llm = AsyncLLM(llama_dir, dtype="float32", num_kv_blocks=256, request_limits=RequestLimits(max_n=32))
    yield llm
    llm.shutdown()


@pytest.fixture
async def http(engine):
    app = build_app(engine, MODEL, allowed_logits_processors=PROCESSORS)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60) as client:
        yield client


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "Hello", "max_tokens": 4, **fields}


async def assert_400(http, body: dict, needle: str, route: str = "/v1/completions") -> None:
    response = await http.post(route, json=body)
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]["message"], response.text


async def assert_serves(http) -> None:
    response = await http.post("/v1/completions", json=completion(temperature=0.0))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] == "length"


async def final(llm, prompt, params):
    async for out in llm.generate(prompt, params):
        pass
    return out


# ---- values past what later stages hold ----

async def test_top_k_past_int32_is_400_and_the_engine_serves_on(http, engine):
    await assert_400(http, completion(top_k=2**31), "top_k")
    assert not engine.is_dead
    await assert_serves(http)


BIG = 2**64 + 1  # no msgpack integer holds it
BEYOND_64_BITS = [
    ("logit_bias", {"logit_bias": {str(BIG): 1.0}}),
    ("allowed_token_ids", {"allowed_token_ids": [BIG]}),
    ("stop_token_ids", {"stop_token_ids": [BIG]}),
    ("top_k", {"top_k": BIG}),
    ("no_repeat_ngram_size", {"no_repeat_ngram_size": BIG}),
    ("priority", {"priority": BIG}),
    ("seed", {"seed": BIG}),
    ("n", {"n": BIG}),
    ("max_tokens", {"max_tokens": BIG}),
    ("min_tokens", {"min_tokens": BIG}),
    ("logprobs", {"logprobs": BIG}),
]


@pytest.mark.parametrize("field,fields", BEYOND_64_BITS, ids=[f for f, _ in BEYOND_64_BITS])
async def test_integer_beyond_64_bits_is_400_naming_the_field(http, field, fields):
    await assert_400(http, completion(**fields), field)


@pytest.mark.parametrize("field,value", [("temperature", 1e39), ("repetition_penalty", 1e39),
                                         ("repetition_penalty", 1e-300)])
async def test_float_past_float32_is_400_naming_the_field(http, field, value):
    await assert_400(http, completion(**{field: value}), field)


async def test_token_id_past_the_vocabulary_is_400(http, engine):
    vocab = engine.hf_config.vocab_size
    await assert_400(http, completion(allowed_token_ids=[vocab]), "allowed_token_ids")
    await assert_400(http, completion(logit_bias={str(vocab): 1.0}), "logit_bias")


async def test_priority_past_int64_is_a_value_error_in_python(engine):
    with pytest.raises(ValueError, match=r"^priority must be an int in \[-9223372036854775808, "):
        async for _ in engine.generate(PROMPT, SamplingParams(max_tokens=2), priority=2**63):
            pass


async def test_seed_past_int64_is_refused_with_the_seed_the_caller_sent(engine):
    with pytest.raises(ValueError, match=r"^seed must be an int in .*, got 18446744073709551615$"):
        await final(engine, PROMPT, SamplingParams(n=2, seed=2**64 - 1, max_tokens=2))


async def test_n_samples_of_the_largest_seed_wrap_within_int64(engine):
    out = await final(engine, PROMPT, SamplingParams(n=2, seed=2**63 - 1, max_tokens=3, ignore_eos=True))
    assert [len(c.token_ids) for c in out.outputs] == [3, 3]


# ---- fan-out past the request limits ----

async def test_n_past_the_limit_is_400_naming_it(http):
    await assert_400(http, completion(n=33), "n must be at most 32")
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 10**9, "stream": True}
    await assert_400(http, chat, "n must be at most 32", "/v1/chat/completions")


async def test_logprobs_past_the_limit_is_400_naming_it(http):
    await assert_400(http, completion(logprobs=21), "logprobs must be at most 20")


async def test_adding_n_samples_yields_to_the_event_loop(engine):
    seen: list[int] = []

    async def watch() -> None:
        while len(seen) < 1000 and (not seen or seen[-1] < 32):
            seen.append(len(engine.output_processor.states))
            await asyncio.sleep(0)

    stream = engine.generate(PROMPT, SamplingParams(n=32, max_tokens=2, ignore_eos=True))
    first = asyncio.ensure_future(anext(stream))
    await asyncio.gather(first, watch())
    await stream.aclose()
    assert any(0 < count < 32 for count in seen), seen  # others ran while the samples were added


async def test_leaving_while_n_samples_are_added_aborts_every_one(engine):
    stream = engine.generate(PROMPT, SamplingParams(n=32, max_tokens=1000, ignore_eos=True))
    first = asyncio.ensure_future(anext(stream))
    while not engine.output_processor.states:
        await asyncio.sleep(0)
    first.cancel()  # the caller leaves while its samples are still being added
    with pytest.raises(asyncio.CancelledError):
        await first
    assert not engine.output_processor.states
    stats = await wait_idle(engine)
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0


# ---- logits processors ----

async def test_unresolvable_logits_processor_fails_in_the_frontend_and_the_engine_serves_on(engine):
    for path, why in (("conveyor_test_missing_module:boom", "cannot be imported"), ("os:sep", "is not callable")):
        with pytest.raises(ValueError, match=f"logits_processors entry '{path}' {why}"):
            await final(engine, PROMPT, SamplingParams(max_tokens=2, logits_processors=[path]))
    assert not engine.is_dead
    out = await final(engine, PROMPT, SamplingParams(max_tokens=2))
    assert out.outputs[0].finish_reason == "length"


async def test_logits_processor_that_raises_fails_its_own_request_only(engine):
    bad = SamplingParams(max_tokens=8, ignore_eos=True, logits_processors=[PROCESSORS[1]])
    good = SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0)
    failed, served = await asyncio.gather(final(engine, PROMPT, bad), final(engine, PROMPT, good))
    assert failed.finished and failed.outputs[0].finish_reason == "error"
    assert failed.error_message == (f"logits processor '{PROCESSORS[1]}' failed: "
                                    "RuntimeError: this processor fails on the third token")
    assert len(failed.outputs[0].token_ids) == 2
    assert served.outputs[0].finish_reason == "length" and len(served.outputs[0].token_ids) == 8
    assert not engine.is_dead


async def test_logits_processors_over_http_must_be_allowed_by_the_server(http):
    await assert_400(http, completion(logits_processors=["os:system"]), "logits_processors must name processors")
    response = await http.post("/v1/completions", json=completion(logits_processors=[PROCESSORS[0]]))
    assert response.status_code == 200, response.text
    tokens = (await http.post("/tokenize", json={"prompt": response.json()["choices"][0]["text"],
                                                  "add_special_tokens": False})).json()["tokens"]
    assert set(tokens) == {42}


async def test_logits_processor_failing_over_http_is_an_error_for_that_request(http):
    await assert_400(http, completion(logits_processors=[PROCESSORS[1]], max_tokens=8), "fails on the third token")
    await assert_serves(http)


# ---- errors sent to clients ----

class DeadEngine:
    is_dead = False
    max_model_len = 16
    tokenizer = SimpleNamespace(get_vocab=lambda: {"a": 0})  # for the server's prompt-length check

    async def generate(self, *args, **kwargs):
        raise EngineDeadError('engine is dead: WorkerFailure: worker rank 0 failed:\nTraceback (most recent call '
                              'last):\n  File "/srv/conveyor/gpu_worker/worker.py", line 52, in run_steps\n'
                              '    result = runner.execute_model(message)\nRuntimeError: CUDA error: boom')
        yield


@pytest.mark.parametrize("stream", [False, True])
async def test_engine_death_reaches_clients_without_the_traceback(stream):
    app = build_app(DeadEngine(), MODEL)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        response = await http.post("/v1/completions", json=completion(stream=stream))
    assert response.status_code == 503
    assert response.json()["error"]["message"] == \
        "engine is dead: WorkerFailure: worker rank 0 failed: RuntimeError: CUDA error: boom"
