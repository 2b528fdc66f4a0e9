"""Property tests over hostile inputs: whatever SamplingParams or an OpenAI request accepts can be
encoded for the engine and sampled; whatever they refuse is a ValueError naming the field; and no
frame, random or truncated, makes a socket's decoder raise anything but msgspec.DecodeError."""

import msgspec
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from conveyor.config import RequestLimits
from conveyor.frontend.async_llm import check_priority
from conveyor.frontend.protocol import ChatCompletionRequest, CompletionRequest, to_sampling_params
from conveyor.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams
from conveyor.gpu_worker.rejection_sampler import draft_row_states
from conveyor.gpu_worker.sampler import Sampler, make_sampling_state
from conveyor.ipc.messages import (Abort, CachedRequestData, EmbeddingTable, EngineCoreInput, EngineCoreOutput,
                                   EngineCoreOutputMessage, EngineCoreOutputs, EngineCoreRequest, EngineDead,
                                   Logprobs, ModelRunnerOutput, NewRequestData, SchedulerOutput, SchedulerStats,
                                   UtilityCall, UtilityResult, WorkerCall, WorkerError, WorkerInput, WorkerOutput,
                                   WorkerResult)
from conveyor.ipc.serial import Decoder, Encoder
from conveyor.gpu_worker.model_runner import embedding_tensor
from conveyor.lora import LoRARequest

V = 32  # the sampler's vocabulary in these tests
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class CharTokenizer:
    """One token per character, modulo the vocabulary."""

    def __len__(self) -> int:
        return V

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) % V for c in text]


# ---- values: ordinary ones, with a few fields swapped for values past every edge ----

huge_ints = st.sampled_from([-(2**64), -(2**63) - 1, -(2**63), -(2**31) - 1, -2, -1, 0, 2**31 - 1, 2**31,
                             2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**80])
edge_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                        st.sampled_from([0.0, -0.0, 1e-5, 1e-39, 1e-300, 1e38, 3.5e38, 1e39, 1e308]))
token_ids = st.integers(0, V - 1)
words = st.lists(st.text(alphabet="ab #", min_size=1, max_size=4), max_size=3)
# values past what the engine holds, shaped as JSON could carry them (any field may get any)
HOSTILE = st.one_of(huge_ints, edge_floats, st.lists(huge_ints, min_size=1, max_size=2),
                    st.dictionaries(huge_ints, st.floats(-1, 1), min_size=1, max_size=2),
                    st.sampled_from([None, "", "x", [], {}, [""], True]))

VALID = {
    "n": st.integers(1, 4), "temperature": st.floats(0.0, 2.0), "top_p": st.floats(0.01, 1.0),
    "top_k": st.integers(-1, V + 2), "min_p": st.floats(0.0, 1.0),
    "seed": st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
    "repetition_penalty": st.floats(0.5, 2.0), "presence_penalty": st.floats(-2.0, 2.0),
    "frequency_penalty": st.floats(-2.0, 2.0), "no_repeat_ngram_size": st.integers(0, 3),
    "logit_bias": st.dictionaries(token_ids, st.floats(-100.0, 100.0), max_size=3),
    "allowed_token_ids": st.one_of(st.none(), st.lists(token_ids, min_size=1, max_size=4)),
    "bad_words": words, "max_tokens": st.one_of(st.none(), st.integers(4, 40)), "min_tokens": st.integers(0, 3),
    "ignore_eos": st.booleans(), "stop": st.one_of(st.text(alphabet="ab", min_size=1, max_size=3), words),
    "stop_token_ids": st.lists(token_ids, max_size=3),
    "logprobs": st.one_of(st.none(), st.integers(0, 5)), "prompt_logprobs": st.one_of(st.none(), st.integers(0, 5)),
    "length_penalty": st.floats(-2.0, 2.0), "early_stopping": st.booleans(),
    "output_kind": st.sampled_from(list(RequestOutputKind)),
    "structured_outputs": st.one_of(st.none(), st.builds(StructuredOutputsParams, regex=st.just("[ab]+")),
                                    st.builds(StructuredOutputsParams, choice=st.lists(st.text(min_size=1), min_size=1,
                                                                                       max_size=3))),
    "draft_token_ids": st.one_of(st.none(), st.lists(token_ids, min_size=1, max_size=40)),
}
# structured-output constraints as request bodies carry them: well-formed, malformed, or of the wrong type
CONSTRAINT_FIELDS = {
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "xml"}, {},
                                        {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
                                        {"type": "json_schema", "json_schema": {"name": "x"}}]),
    "structured_outputs": st.sampled_from([{"regex": "a+"}, {"choice": ["a", "b"]}, {"json_object": True}, {},
                                           {"regex": "a", "json": {}}, {"bogus": 1}, {"choice": []}]),
    "guided_json": st.sampled_from([{"type": "object"}, "{}", "{not json", ""]),
    "guided_regex": st.text(max_size=4),
    "guided_choice": st.lists(st.text(max_size=3), max_size=3),
    "guided_grammar": st.sampled_from(['root ::= "a"', ""]),
}
TOOL = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.sampled_from(["f", "g", "bad name"])},
    optional={"parameters": st.sampled_from([{"type": "object"}, {}, {"type": "object", "properties": {
        "x": {"type": "integer"}}}])})})
TOOL_FIELDS = {
    "tools": st.lists(TOOL, max_size=2),
    "tool_choice": st.sampled_from(["none", "auto", "required", "any", {"type": "function", "function": {"name": "f"}},
                                    {"type": "function", "function": {"name": "h"}}]),
    "parallel_tool_calls": st.booleans(),
}


@st.composite
def with_hostile_fields(draw, valid: dict) -> dict:
    """Fields drawn from `valid`, then up to two of them swapped for HOSTILE values."""
    fields = draw(st.fixed_dictionaries({}, optional=valid))
    for name in draw(st.lists(st.sampled_from(sorted(valid)), max_size=2, unique=True)):
        fields[name] = draw(HOSTILE)
    return fields


# a chat request's fields that reach SamplingParams under another name
ALIASES = {"max_tokens": ("max_completion_tokens",), "logprobs": ("top_logprobs",)}


def assert_names_a_field(error: ValueError, fields) -> None:
    name = str(error).split(" ", 1)[0].split(".", 1)[0]  # a field, or a part of one (field.part)
    assert name in fields or any(alias in fields for alias in ALIASES.get(name, ())), str(error)


def encode_for_the_engine(params: SamplingParams, priority: int = 0) -> None:
    """As AsyncLLM sends it: the request to the core, and on to a worker; both decode it back."""
    request = EngineCoreRequest("r", [1, 2, 3], params, 0.0, priority=priority)
    assert Decoder(EngineCoreInput).decode(Encoder().encode(request)) == request
    drafts = {"r": params.draft_token_ids} if params.draft_token_ids else {}
    step = SchedulerOutput(0, [NewRequestData("r", [1, 2, 3], params, [0], 0)], CachedRequestData(),
                           [3 + len(params.draft_token_ids or ())], [], draft_token_ids=drafts)
    assert Decoder(WorkerInput).decode(Encoder().encode(step)) == step


def sample(params: SamplingParams, output: list[int]) -> None:
    """A step of the sampler: a token of the vocabulary, one the request allows unless it failed;
    with drafts, a verifying step's rows, one per draft and one after them."""
    state = make_sampling_state(params, [1, 2, 3], "cpu", seed=0)
    state.output_token_ids.extend(output)
    rows = draft_row_states(state, params.draft_token_ids[:4]) if params.draft_token_ids else [state]
    logits = torch.randn(len(rows), V, generator=torch.Generator().manual_seed(0))
    for row, token in zip(rows, Sampler(V)(logits, rows).sampled_token_ids):
        assert 0 <= token < V
        if row.error is None and params.allowed_token_ids is not None:
            assert token in params.allowed_token_ids


def accepted(make, fields) -> SamplingParams | None:
    """The params the frontend would send for `fields` (bound to the vocabulary), or None when it
    refuses them, as it must: a ValueError naming one of the fields (pydantic's, for a body)."""
    try:
        params = make()
        params.check_limits(RequestLimits())
        bound = msgspec.msgpack.decode(msgspec.msgpack.encode(params), type=SamplingParams)
        return bound.bind_tokenizer(CharTokenizer(), eos_token_id=0)
    except ValidationError as e:
        assert all(err["loc"] and err["loc"][0] in fields for err in e.errors()), e
    except ValueError as e:
        assert_names_a_field(e, fields)
    return None


@FUZZ
@given(kwargs=with_hostile_fields(VALID), output=st.lists(token_ids, max_size=3))
def test_sampling_params_encode_and_sample_or_refuse_naming_the_field(kwargs, output):
    params = accepted(lambda: SamplingParams(**kwargs), kwargs)
    if params is not None:
        encode_for_the_engine(params)
        sample(params, output)


# ---- LoRA requests ----

LORA_VALID = {"lora_name": st.text(min_size=1, max_size=4), "lora_int_id": st.integers(1, 2**31 - 1),
              "lora_path": st.one_of(st.none(), st.text(min_size=1, max_size=4)),
              "lora_weights": st.one_of(st.none(), st.just({"w": torch.zeros(1)})),
              "lora_config": st.one_of(st.none(), st.just({"r": 1}))}


@FUZZ
@given(fields=with_hostile_fields(LORA_VALID))
def test_lora_request_is_built_or_refused_naming_the_field(fields):
    fields = {"lora_name": "a", "lora_int_id": 1, **fields}
    try:
        request = LoRARequest(**fields)
    except ValueError as e:
        assert any(name in str(e).split(" ")[0] for name in fields), str(e)
        return
    assert isinstance(request.lora_name, str) and request.lora_name
    assert 1 <= request.lora_int_id <= 2**31 - 1
    assert (request.lora_weights is None) == (request.lora_config is None)
    assert request.lora_path is None or request.lora_weights is None
    message = EngineCoreRequest("r", [1], SamplingParams(), 0.0, lora_id=request.lora_int_id,
                                lora_path=request.lora_path)
    assert Decoder(EngineCoreInput).decode(Encoder().encode(message)) == message


@FUZZ
@given(dtype=st.sampled_from(["float32", "bfloat16", "float16", "int8", "", "x" * 40]),
       shape=st.lists(st.one_of(st.integers(-2, 5), st.sampled_from([-(2**63), 2**31, 2**63 - 1, 2**64 - 1])),
                      max_size=3), data=st.binary(max_size=80))
def test_prompt_embedding_table_is_refused_by_the_core_or_fits_the_worker(dtype, shape, data):
    table = EmbeddingTable(dtype, shape, data)
    message = EngineCoreRequest("r", [1], SamplingParams(), 0.0, prompt_embedding_table=table)
    decoded = Decoder(EngineCoreInput, tensors=False).decode(Encoder().encode(message))
    problem = decoded.prompt_embedding_table.problem(hidden_size=4)
    if problem is None:
        assert embedding_tensor(table, torch.float32, torch.device("cpu")).shape == (shape[0], 4)
    else:
        assert problem.startswith("prompt_embedding_table")


# ---- OpenAI request bodies ----

BODY = {name: VALID[name] for name in (
    "n", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
    "repetition_penalty", "min_tokens", "stop_token_ids", "allowed_token_ids", "no_repeat_ngram_size",
    "max_tokens", "stop", "bad_words", "ignore_eos")}
BODY |= {"logit_bias": st.dictionaries(token_ids.map(str), st.floats(-100.0, 100.0), max_size=3),
         "best_of": st.integers(1, 4), "priority": st.integers(-5, 5),
         "logits_processors": st.lists(st.sampled_from(["os:system", "pkg.mod:fn"]), max_size=1)}


def body_params(request: CompletionRequest | ChatCompletionRequest) -> SamplingParams:
    """What the server makes of a body: its SamplingParams, once AsyncLLM took its priority."""
    check_priority(request.priority)
    return to_sampling_params(request)


@FUZZ
@given(fields=with_hostile_fields({**BODY, **CONSTRAINT_FIELDS, "logprobs": st.integers(0, 5), "echo": st.booleans()}))
def test_completion_request_encodes_or_refuses_naming_the_field(fields):
    params = accepted(lambda: body_params(CompletionRequest(prompt="hi", **fields)), fields)
    if params is not None:
        encode_for_the_engine(params, fields.get("priority", 0))


@FUZZ
@given(fields=with_hostile_fields({**BODY, **CONSTRAINT_FIELDS, **TOOL_FIELDS, "logprobs": st.booleans(),
                                   "top_logprobs": st.integers(0, 5), "max_completion_tokens": st.integers(4, 40)}))
def test_chat_request_encodes_or_refuses_naming_the_field(fields):
    messages = [{"role": "user", "content": "hi"}]
    params = accepted(lambda: body_params(ChatCompletionRequest(messages=messages, **fields)), fields)
    if params is not None:
        encode_for_the_engine(params, fields.get("priority", 0))


# ---- every socket's decoder ----

LP = Logprobs(3, -0.5, 1, [3, 4], [-0.5, -1.5])
PARAMS = SamplingParams(n=2, seed=5, logit_bias={3: 1.0}, stop=["x"], logprobs=2, eos_token_id=0)
SOCKETS = {
    "core input": (EngineCoreInput, [
        EngineCoreRequest("r1", [1, 2, 3], PARAMS, 1.5, priority=-2, cache_salt="s"),
        EngineCoreRequest("r2", [1], PARAMS, 1.5, lora_id=3, lora_path="/adapters/a",
                          prompt_embedding_table=EmbeddingTable("float32", [1, 2], bytes(8))),
        Abort(["r1", "r2"]), UtilityCall(7, "stats", [1, "a"])]),
    "core output": (EngineCoreOutputMessage, [
        EngineCoreOutputs([EngineCoreOutput("r1", [4, 5], [LP], [None, LP], "stop", 5, 2, 1.0)], 2.0,
                          SchedulerStats(1, 2, 0.5)),
        UtilityResult(7, {"a": 1}), EngineDead("gone")]),
    "worker input": (WorkerInput, [
        SchedulerOutput(3, [NewRequestData("r1", [1, 2], PARAMS, [0, 1], 0, [9])],
                        CachedRequestData(["r2"], [[4]], [17]), [2, 1], ["r0"]),
        SchedulerOutput(4, [NewRequestData("r3", [1], PARAMS, [2], 0, lora_id=7)], CachedRequestData(), [1], [],
                        [5], {7: "/adapters/b"}),
        SchedulerOutput(5, [NewRequestData("r1", [1, 2], PARAMS, [0, 1], 0, [9])],
                        CachedRequestData(["r2"], [[4]], [17]), [2, 3], ["r0"], draft_token_ids={"r2": [5, 6]},
                        trimmed_blocks={"r2": 1}),
        WorkerCall("init_kv_cache", [12])]),
    "worker output": (WorkerOutput, [
        ModelRunnerOutput(3, ["r1"], [[7]], [[LP]], {"r1": [None, LP]}, 0.1, {"r2": "failed"}),
        WorkerResult(torch.arange(6, dtype=torch.float32).reshape(2, 3)), WorkerError(0, "boom")]),
}


def frames_of(message) -> list[bytes]:
    return [bytes(frame) for frame in Encoder().encode(message)]


def decodes_or_fails_cleanly(type_, frames) -> None:
    try:
        Decoder(type_).decode(frames)
    except msgspec.DecodeError:
        pass


@pytest.mark.parametrize("socket", SOCKETS)
def test_every_socket_decodes_its_own_messages(socket):
    type_, messages = SOCKETS[socket]
    for message in messages:
        got = Decoder(type_).decode(frames_of(message))
        if isinstance(message, WorkerResult):
            assert torch.equal(got.result, message.result)
        else:
            assert got == message


@pytest.mark.parametrize("socket", SOCKETS)
@settings(max_examples=100, deadline=None)
@given(frames=st.lists(st.binary(max_size=64), max_size=3))
def test_random_frames_fail_only_as_decode_errors(socket, frames):
    decodes_or_fails_cleanly(SOCKETS[socket][0], frames)


@pytest.mark.parametrize("socket", SOCKETS)
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_truncated_or_corrupted_frames_fail_only_as_decode_errors(socket, data):
    type_, messages = SOCKETS[socket]
    frames = frames_of(data.draw(st.sampled_from(messages)))
    i = data.draw(st.integers(0, len(frames) - 1))
    frame = frames[i]
    how = data.draw(st.sampled_from(["truncate", "flip", "drop"]))
    if how == "truncate":
        frames[i] = frame[:data.draw(st.integers(0, max(len(frame) - 1, 0)))]
    elif how == "flip":
        assume(frame)
        at = data.draw(st.integers(0, len(frame) - 1))
        frames[i] = frame[:at] + bytes([data.draw(st.integers(0, 255))]) + frame[at + 1:]
    else:
        del frames[i]
    decodes_or_fails_cleanly(type_, frames)


@pytest.mark.parametrize("header", [("float32", [10**12], 1), ("load", [1], 1), ("float32", [-1], 1),
                                    ("float32", [2], 5), ("float32", [2], -1), ("float32", [3], 1)])
def test_tensor_headers_that_do_not_match_their_frame_are_decode_errors(header):
    ext = msgspec.msgpack.Ext(1, msgspec.msgpack.encode(header))
    frames = [msgspec.msgpack.encode(WorkerResult(ext)), b"\0" * 8]
    with pytest.raises(msgspec.DecodeError):
        Decoder(WorkerOutput).decode(frames)
