"""The OpenAI-compatible server, live on 127.0.0.1, driven by the official `openai` client and by raw
HTTP for the error paths."""

import asyncio
import json
import re
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import jsonschema
import openai
import pytest
import uvicorn

from conveyor import AsyncLLM
from conveyor.frontend.api_server import build_app
from conveyor.frontend import prompts
from conveyor.frontend.errors import EngineDeadError
from idle import wait_idle

MODEL = "tiny-llama"
API_KEY = "test-key"
MAX_MODEL_LEN = 2048  # the tiny model's limit: the abort tests need the longest generation it allows
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


def start_server(app) -> tuple[uvicorn.Server, threading.Thread, str]:
    """uvicorn on a free port of 127.0.0.1, in a thread of this process."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, loop="uvloop", log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def live(llama_dir):
    engine = AsyncLLM(llama_dir, dtype="float32", num_kv_blocks=256, max_model_len=MAX_MODEL_LEN)
    server, thread, url = start_server(build_app(engine, MODEL, api_key=API_KEY))
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    yield SimpleNamespace(engine=engine, url=url, client=client, http=http)
    http.close()
    client.close()
    server.should_exit = True
    thread.join(timeout=10)
    engine.shutdown()
    assert not thread.is_alive()


def asgi_client(live, headers: dict | None = None, **options) -> httpx.AsyncClient:
    """A client of another app over the live engine, built with `options`, called in-process."""
    app = build_app(live.engine, MODEL, api_key=API_KEY, **options)
    headers = {"Authorization": f"Bearer {API_KEY}"} if headers is None else headers
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", headers=headers,
                             timeout=60)


def assert_error(response: httpx.Response, status: int, needle: str = "") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert needle in error["message"]
    return error


# ---- completions ----

def test_completion_returns_text_and_usage(live):
    out = live.client.completions.create(model=MODEL, prompt="Hello there", max_tokens=5, **GREEDY)
    prompt_len = live.http.post("/tokenize", json={"prompt": "Hello there"}).json()["count"]
    assert out.object == "text_completion" and out.model == MODEL
    assert len(out.choices) == 1 and out.choices[0].finish_reason == "length" and out.choices[0].text
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == \
        (prompt_len, 5, prompt_len + 5)


def test_streamed_completion_equals_whole_one_and_ends_with_usage(live):
    whole = live.client.completions.create(model=MODEL, prompt="Once upon", max_tokens=8, **GREEDY)
    chunks = list(live.client.completions.create(model=MODEL, prompt="Once upon", max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_stream_is_server_sent_events_ending_with_done(live):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True}
    with live.http.stream("POST", "/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_completion_logprobs_have_one_entry_per_token(live):
    out = live.client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, logprobs=2, **GREEDY)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(2 <= len(top) <= 3 for top in lp.top_logprobs)
    assert "".join(lp.tokens) == out.choices[0].text


def test_n_returns_n_choices(live):
    out = live.client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, n=2, temperature=1.0,
                                         seed=7, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert out.usage.completion_tokens == 12


def test_streamed_n_covers_every_choice(live):
    chunks = list(live.client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, n=2, stream=True,
                                                 **GREEDY))
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_stop_string_ends_the_text_before_it(live):
    full = live.client.completions.create(model=MODEL, prompt="The", max_tokens=16, **GREEDY).choices[0].text
    start = next(i for i in range(len(full) // 3, len(full) - 2) if full[i:i + 2].isalnum())
    stop = full[start:start + 2]
    out = live.client.completions.create(model=MODEL, prompt="The", max_tokens=16, stop=[stop], **GREEDY)
    assert out.choices[0].text == full[:full.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def cached_tokens(out) -> int:
    return out.usage.prompt_tokens_details.cached_tokens


def test_completions_share_cached_prefixes_only_within_a_cache_salt(live):
    prompt = list(range(100, 140))  # 40 tokens no other test sends: 2 full blocks of 16 to share
    cached = [cached_tokens(live.client.completions.create(model=MODEL, prompt=prompt, max_tokens=1,
                                                           extra_body={"cache_salt": salt}))
              for salt in ("a", "b", "a")]
    assert cached == [0, 0, 32]


@pytest.mark.parametrize("salt", ["", 5])
def test_bad_cache_salt_is_400_naming_it(live, salt):
    assert_error(live.http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "cache_salt": salt}),
                 400, "cache_salt")


# ---- chat ----

def test_chat_completion_applies_the_chat_template(live):
    messages = [{"role": "user", "content": "Say something"}]
    out = live.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, **GREEDY)
    templated = live.http.post("/tokenize", json={"messages": messages}).json()["count"]
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content
    assert out.usage.prompt_tokens == templated and out.usage.completion_tokens == 5


def test_chats_share_cached_prefixes_only_within_a_cache_salt(live):
    messages = [{"role": "user", "content": "a salted conversation " * 8}]
    outs = [live.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1,
                                                extra_body={"cache_salt": salt}) for salt in ("a", "b", "a")]
    full_blocks = (outs[0].usage.prompt_tokens - 1) // 16 * 16
    assert full_blocks > 0 and [cached_tokens(out) for out in outs] == [0, 0, full_blocks]


def test_streamed_chat_starts_with_role_and_equals_whole_one(live):
    messages = [{"role": "user", "content": "Hi"}]
    whole = live.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, **GREEDY)
    chunks = list(live.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                                      stream=True, stream_options={"include_usage": True},
                                                      **GREEDY))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 6


def test_chat_logprobs_list_top_alternatives(live):
    out = live.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=3, logprobs=True, top_logprobs=2, **GREEDY)
    content = out.choices[0].logprobs.content
    assert len(content) == 3
    for token in content:
        assert len(token.top_logprobs) == 2
        assert token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob)  # greedy picks the best


# ---- other routes ----

# ---- structured outputs and tool calling ----

SCHEMA = {"type": "object", "properties": {"name": {"enum": ["ada", "bob"]}, "age": {"type": "integer", "minimum": 0,
                                                                                   "maximum": 120}},
          "required": ["name", "age"]}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                                 "parameters": {"type": "object", "required": ["city", "days"],
                                                                "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                                                               "days": {"type": "integer", "minimum": 1,
                                                                                        "maximum": 7}}}}}


def test_chat_response_format_json_schema_answers_json_of_the_schema(live):
    out = live.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Who?"}], max_tokens=100, n=2,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


@pytest.mark.parametrize("extra, check", [
    ({"guided_json": SCHEMA}, lambda text: jsonschema.validate(json.loads(text), SCHEMA) is None),
    ({"guided_regex": "[0-9]{2}:[0-9]{2}"}, lambda text: re.fullmatch("[0-9]{2}:[0-9]{2}", text)),
    ({"guided_choice": ["left", "right"]}, lambda text: text in ("left", "right")),
    ({"guided_grammar": 'root ::= "a" | "bb"'}, lambda text: text in ("a", "bb")),
    ({"structured_outputs": {"choice": ["up", "down"]}}, lambda text: text in ("up", "down")),
])
def test_completion_constraints_hold(live, extra, check):
    out = live.client.completions.create(model=MODEL, prompt="Say:", max_tokens=100, temperature=1.0, seed=1,
                                         extra_body=extra)
    assert out.choices[0].finish_reason == "stop" and check(out.choices[0].text), out.choices[0].text


def test_chat_response_format_json_object_is_a_json_object(live):
    brace = live.engine.tokenizer.convert_tokens_to_ids("}")  # favoured: a random model's object ends
    out = live.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "JSON?"}],
                                              max_tokens=20, response_format={"type": "json_object"},
                                              logit_bias={str(brace): 100})
    assert json.loads(out.choices[0].message.content) == {} and out.choices[0].finish_reason == "stop"


def test_a_constraint_that_cannot_compile_is_400_naming_it(live):
    response = live.http.post("/v1/completions", json={"prompt": "x", "guided_regex": "(unclosed"})
    assert_error(response, 400, "structured_outputs.regex cannot be compiled")
    response = live.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                            "response_format": {"type": "json_schema"}})
    assert_error(response, 400, "response_format.json_schema.schema must be a JSON schema")
    response = live.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                            "tool_choice": "required"})
    assert_error(response, 400, "tool_choice must be none without tools")


def test_required_tool_call_round_trips_with_its_result_in_the_next_turn(live):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    first = live.client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL],
                                                tool_choice="required", parallel_tool_calls=False, max_tokens=100)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER_TOOL["function"]["parameters"])

    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    final = live.client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL],
                                                tool_choice="none", max_tokens=5, extra_body={"ignore_eos": True})
    assert final.choices[0].message.tool_calls in (None, []) and final.choices[0].finish_reason == "length"
    tokens = live.http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    rendered = live.engine.tokenizer.decode(tokens)
    assert "<|im_start|>tool\nsunny, 21 C<|im_end|>" in rendered
    assert '<tool_call>{"name": "get_weather", "arguments": ' + json.dumps(arguments) in rendered


def test_tools_reach_the_chat_template(live):
    out = live.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                              tools=[WEATHER_TOOL], max_tokens=1)
    plain = live.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=1)
    assert out.usage.prompt_tokens > plain.usage.prompt_tokens + 20


def test_named_tool_choice_streams_its_arguments_as_deltas(live):
    chunks = list(live.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER_TOOL], max_tokens=100,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True))
    calls = [call for chunk in chunks for choice in chunk.choices for call in choice.delta.tool_calls or ()]
    assert calls[0].id and calls[0].function.name == "get_weather" and all(c.index == 0 for c in calls)
    arguments = "".join(c.function.arguments or "" for c in calls)
    jsonschema.validate(json.loads(arguments), WEATHER_TOOL["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert not any(choice.delta.content for chunk in chunks for choice in chunk.choices)


def test_models_lists_the_served_name(live):
    assert [m.id for m in live.client.models.list().data] == [MODEL]


def test_tokenize_then_detokenize_round_trips(live):
    ids = live.http.post("/tokenize", json={"prompt": "round trip", "add_special_tokens": False}).json()["tokens"]
    assert live.http.post("/detokenize", json={"tokens": ids}).json()["prompt"] == "round trip"


def test_health_is_ok_while_the_engine_runs(live):
    assert live.http.get("/health").status_code == 200


def test_metrics_expose_request_and_engine_figures(live):
    live.client.completions.create(model=MODEL, prompt="metrics", max_tokens=2, **GREEDY)
    text = live.http.get("/metrics").text
    for name in ("conveyor_request_success_total", "conveyor_prompt_tokens_total",
                 "conveyor_generation_tokens_total", "conveyor_time_to_first_token_seconds_bucket",
                 "conveyor_time_per_output_token_seconds_bucket", "conveyor_e2e_request_latency_seconds_bucket",
                 "conveyor_request_queue_time_seconds_bucket", "conveyor_num_requests_running",
                 "conveyor_num_requests_waiting", "conveyor_kv_cache_usage_perc", "conveyor_prefix_cache_hit_rate"):
        assert name in text
    assert f'conveyor_request_success_total{{finished_reason="length",model_name="{MODEL}"}}' in text


# ---- errors ----

def test_malformed_json_is_400(live):
    response = live.http.post("/v1/completions", content=b'{"model": "tiny-llama", "prompt": ',
                              headers={"Content-Type": "application/json"})
    assert_error(response, 400)


def test_wrong_types_are_400(live):
    assert_error(live.http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": "five"}),
                 400, "max_tokens")
    assert_error(live.http.post("/v1/chat/completions", json={"model": MODEL, "messages": "hi"}), 400, "messages")


def test_out_of_range_sampling_value_is_400_naming_it(live):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        live.client.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=-1.0)


def test_integers_beyond_int64_are_400_naming_the_field(live):
    for field, value in [("stop_token_ids", [2**64]), ("allowed_token_ids", [2**64]), ("min_tokens", 2**64),
                         ("no_repeat_ngram_size", 2**64), ("logit_bias", {str(2**64): 1.0})]:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 2, field: value}
        assert assert_error(live.http.post("/v1/completions", json=body), 400)["param"] == field


def test_unknown_model_is_404(live):
    with pytest.raises(openai.NotFoundError):
        live.client.completions.create(model="no-such-model", prompt="x", max_tokens=2)


def test_missing_or_wrong_api_key_is_401(live):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    assert_error(httpx.post(f"{live.url}/v1/completions", json=body), 401)
    assert_error(httpx.get(f"{live.url}/v1/models", headers={"Authorization": "Bearer wrong"}), 401)


def test_every_route_but_health_needs_the_api_key(live):
    for method, path in [("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/metrics"), ("GET", "/docs"),
                         ("GET", "/redoc"), ("GET", "/openapi.json"), ("GET", "/v1/models"),
                         ("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter")]:
        assert_error(httpx.request(method, f"{live.url}{path}", json={"prompt": "x", "tokens": [1]}), 401)
    assert httpx.get(f"{live.url}/health").status_code == 200


async def test_public_metrics_serve_metrics_without_the_key_and_nothing_else(live):
    async with asgi_client(live, public_metrics=True, headers={}) as http:
        assert (await http.get("/metrics")).status_code == 200
        assert_error(await http.post("/tokenize", json={"prompt": "x"}), 401)


def test_over_long_prompt_is_400(live):
    body = {"model": MODEL, "prompt": [7] * MAX_MODEL_LEN, "max_tokens": 2}
    assert_error(live.http.post("/v1/completions", json=body), 400, "max_model_len")
    body["stream"] = True
    assert_error(live.http.post("/v1/completions", json=body), 400, "max_model_len")


# ---- request size ----

async def test_body_over_the_limit_is_413(live):
    async with asgi_client(live, max_request_bytes=4096) as http:
        assert_error(await http.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 8192}), 413)
        assert (await http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})
                ).status_code == 200


async def test_chunked_body_over_the_limit_is_413(live):
    async def chunks():
        for _ in range(8):
            yield b"x" * 1024

    async with asgi_client(live, max_request_bytes=4096) as http:
        assert_error(await http.post("/v1/completions", content=chunks()), 413)


async def test_a_50_mb_body_is_413_by_default(live):
    async with asgi_client(live) as http:
        body = b'{"model": "tiny-llama", "prompt": "' + b"x" * (50 << 20) + b'"}'
        assert_error(await http.post("/v1/completions", content=body,
                                     headers={"Content-Type": "application/json"}), 413)


def tokenizer_spy(live, monkeypatch) -> list[int]:
    """The length of every text the engine's tokenizer encodes from now on."""
    seen, encode = [], live.engine.tokenizer.encode

    def spy(text, *args, **kwargs):
        seen.append(len(text))
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(live.engine.tokenizer, "encode", spy)
    return seen


def test_prompt_too_long_by_characters_is_400_before_it_is_tokenized(live, monkeypatch):
    seen = tokenizer_spy(live, monkeypatch)
    prompt = "word " * (800 << 10)  # 4 MiB
    error = assert_error(live.http.post("/v1/completions", json={"model": MODEL, "prompt": prompt}), 400,
                         "characters")
    assert error["param"] == "prompt" and len(prompt) not in seen


def test_chat_too_long_by_characters_is_400_before_it_is_tokenized(live, monkeypatch):
    seen = tokenizer_spy(live, monkeypatch)
    messages = [{"role": "user", "content": "word " * (800 << 10)}]
    error = assert_error(live.http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages}),
                         400, "characters")
    assert error["param"] == "messages" and not [n for n in seen if n > len(messages[0]["content"])]


async def test_short_prompt_is_not_queued_behind_a_long_tokenization(live, monkeypatch):
    long_prompt = "word " * 20000  # 100,000 characters: tokenized for real, then too many tokens
    started, release = threading.Event(), threading.Event()
    encode = live.engine.tokenizer.encode

    def held(text, *args, **kwargs):  # the long prompt's tokenization takes until released
        if len(text) >= len(long_prompt):
            started.set()
            release.wait(60)
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(live.engine.tokenizer, "encode", held)
    async with httpx.AsyncClient(base_url=live.url, headers={"Authorization": f"Bearer {API_KEY}"},
                                 timeout=60) as http:
        long = asyncio.create_task(http.post("/v1/completions", json={"model": MODEL, "prompt": long_prompt}))
        try:
            assert await asyncio.to_thread(started.wait, 30)
            short = http.post("/v1/completions", json={"model": MODEL, "prompt": "x " * 150, "max_tokens": 2})
            assert (await asyncio.wait_for(short, timeout=30)).status_code == 200
        finally:
            release.set()
        assert_error(await long, 400, "max_model_len")


# ---- chat templates from the request ----

LOOPING_TEMPLATE = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


def test_request_chat_template_is_refused_by_default(live):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    template = "{{ messages[0]['content'] }}"
    error = assert_error(live.http.post("/v1/chat/completions", json={
        **body, "chat_template_kwargs": {"chat_template": template}}), 400, "--trust-request-chat-template")
    assert error["param"] == "chat_template_kwargs.chat_template"
    error = assert_error(live.http.post("/v1/chat/completions", json={**body, "chat_template": template}),
                         400, "--trust-request-chat-template")
    assert error["param"] == "chat_template"


async def test_trusted_request_chat_template_is_rendered(live):
    template = "Q: {{ messages[0]['content'] }} A:"
    async with asgi_client(live, trust_request_chat_template=True) as http:
        count = (await http.post("/tokenize", json={"prompt": "Q: Hi A:", "add_special_tokens": False})).json()
        response = await http.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
            "chat_template": template})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == count["count"]


async def test_trusted_request_chat_template_that_loops_is_stopped(live):
    async with asgi_client(live, trust_request_chat_template=True) as http:
        response = await http.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
            "chat_template_kwargs": {"chat_template": LOOPING_TEMPLATE}})
    assert_error(response, 400, "seconds")


async def test_client_leaving_stops_the_rendering_of_its_chat_template(live, monkeypatch):
    monkeypatch.setattr(prompts, "REQUEST_TEMPLATE_SECONDS", 600.0)  # only the client's leaving can stop it
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    async with asgi_client(live, trust_request_chat_template=True) as http:
        looping = asyncio.create_task(http.post("/v1/chat/completions",
                                                json={**body, "chat_template": LOOPING_TEMPLATE}))
        await asyncio.sleep(0.5)
        looping.cancel()  # the client leaves
        await asyncio.gather(looping, return_exceptions=True)
        # request templates render one at a time: this one waits until the looping one has stopped
        response = await asyncio.wait_for(http.post("/v1/chat/completions", json={
            **body, "chat_template": "{{ messages[0]['content'] }}"}), timeout=30)
    assert response.status_code == 200, response.text


async def test_trusted_request_chat_template_rendering_too_much_is_400(live):
    template = "{% for i in range(100000) %}{{ messages[0]['content'] }}{% endfor %}"
    async with asgi_client(live, trust_request_chat_template=True) as http:
        response = await http.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "0123456789"}], "max_tokens": 1,
            "chat_template": template})
    assert_error(response, 400, "characters")


# ---- clients that leave ----

def aborted_count(live) -> float:
    """The server's count of requests that ended because their client left."""
    for line in live.http.get("/metrics").text.splitlines():
        if line.startswith("conveyor_request_success_total{") and 'finished_reason="abort"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# A starved machine can finish the ~1 s request before the test sees it running; each test then
# lets that request end and starts another, up to ATTEMPTS times.
ATTEMPTS = 5
LONG_BODY = {"model": MODEL, "prompt": "Tell me everything", "max_tokens": MAX_MODEL_LEN - 16, "ignore_eos": True}


async def test_client_leaving_mid_stream_aborts_the_request(live):
    async with httpx.AsyncClient(base_url=live.url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        for _ in range(ATTEMPTS):
            aborted = aborted_count(live)
            async with http.stream("POST", "/v1/completions", json={**LONG_BODY, "stream": True}) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        break
                running = (await live.engine.get_stats())["num_running"] == 1
            if running:  # and the client has now hung up on it
                break
        else:
            pytest.fail("the request always ended before the engine reported it running")
    stats = await wait_idle(live.engine)
    assert stats["num_running"] == 0 and stats["kv_cache_usage"] == 0
    assert aborted_count(live) == aborted + 1  # ended by the abort, not by running out of tokens


async def test_client_leaving_before_a_whole_response_aborts_the_request(live):
    async with httpx.AsyncClient(base_url=live.url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        for _ in range(ATTEMPTS):
            aborted = aborted_count(live)
            post = asyncio.create_task(http.post("/v1/completions", json=LONG_BODY, timeout=60))
            while (await live.engine.get_stats())["num_running"] == 0 and not post.done():
                await asyncio.sleep(0.005)
            if not post.done():
                break
            await post
        else:
            pytest.fail("the request always ended before the engine reported it running")
        post.cancel()  # the client hangs up while its request runs
        with pytest.raises(asyncio.CancelledError):
            await post
    stats = await wait_idle(live.engine)
    assert stats["num_running"] == 0 and stats["kv_cache_usage"] == 0
    assert aborted_count(live) == aborted + 1


# ---- a dead engine (a stand-in: no processes) ----

class DeadEngine:
    is_dead = True
    max_model_len = 16

    async def generate(self, *args, **kwargs):
        raise EngineDeadError("engine is dead: test")
        yield


async def test_dead_engine_makes_health_and_requests_503():
    app = build_app(DeadEngine(), MODEL)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        assert (await http.get("/health")).status_code == 503
        response = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert_error(response, 503)
