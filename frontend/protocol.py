"""OpenAI-compatible request and response bodies, and the mapping of a request to SamplingParams.

Requests are validated strictly (a string where a number belongs is a 400, not a coercion) against
fields that carry their ranges, so /openapi.json describes them (and schemathesis fuzzes them). Unknown
fields are ignored; the OpenAI fields that would change the output and that Conveyor does not
implement (best_of != n, suffix) are refused with a 400.
"""

import json
import time
import uuid
from collections.abc import Collection
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from conveyor.sampling_params import (DEFAULT_MAX_TOKENS, INT32_MAX, RequestOutputKind, SamplingParams,
                                      StructuredOutputsParams)


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


# ---- errors ----

class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class APIError(Exception):
    """A request refused with an HTTP status and OpenAI's error fields (ErrorInfo)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


# ---- shared request fields ----

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Integers cross to the engine as msgpack (int64); larger ones are refused here, not at encoding.
TokenId = Annotated[int, Field(ge=0, le=INT64_MAX, description="a token id of the model's vocabulary")]
TokenIdKey = Annotated[str, Field(pattern=r"^[0-9]{1,18}$", description="a token id, in decimal")]


class StreamOptions(Strict):
    include_usage: bool = Field(False, description="end the stream with a chunk that holds the usage")


class SamplingFields(Strict):
    """What completions and chat completions share, OpenAI's fields first, then extensions."""
    model: str | None = Field(None, description="the served model name (any other is a 404)")
    n: int = Field(1, ge=1, le=INT32_MAX, description="choices to generate for each prompt")
    best_of: int | None = Field(None, ge=1, le=INT32_MAX, description="only n itself is supported")
    stop: str | list[str] | None = Field(None, description="text that ends a choice (not included in it)")
    temperature: float | None = Field(None, ge=0, description="sampling temperature; 0 is greedy (default 1)")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling: the smallest set of tokens "
                                                               "with this much probability (default 1)")
    seed: int | None = Field(None, ge=INT64_MIN, le=2**64 - 1, description="seed of this request's sampling")
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="penalty of tokens already generated")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="penalty per occurrence of a generated token")
    logit_bias: dict[TokenIdKey, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, description="bias added to the logit of each token id (keys are token ids)")
    stream: bool = Field(False, description="send the output as server-sent events")
    stream_options: StreamOptions | None = Field(None, description="options of a streamed response")
    user: str | None = Field(None, description="the end user (accepted, unused)")
    response_format: dict[str, Any] | None = Field(
        None, description='{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema": '
                          '{"name": ..., "schema": {...}}}: the output as JSON, enforced token by token')
    # extensions (vLLM's names)
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1, description="sample from the k most likely tokens; "
                                                                      "-1 or 0 for all (default)")
    min_p: float | None = Field(None, ge=0, le=1, description="drop tokens less likely than this fraction of "
                                                               "the most likely one (default 0)")
    repetition_penalty: float | None = Field(None, gt=0, description="divide the logits of tokens in the prompt "
                                                                      "or output by this (default 1)")
    min_tokens: int = Field(0, ge=0, le=INT64_MAX, description="tokens to generate before a stop may end the choice")
    ignore_eos: bool = Field(False, description="keep generating past the end-of-sequence token")
    stop_token_ids: list[TokenId] | None = Field(None, description="token ids that end a choice")
    include_stop_str_in_output: bool = Field(False, description="keep the stop text in the choice")
    skip_special_tokens: bool = Field(True, description="leave special tokens out of the text")
    spaces_between_special_tokens: bool = Field(True, description="put spaces around special tokens in the text")
    bad_words: list[str] | None = Field(None, description="words never to generate")
    allowed_token_ids: list[TokenId] | None = Field(None, min_length=1,
                                                    description="generate only these token ids")
    no_repeat_ngram_size: int = Field(0, ge=0, le=INT64_MAX, description="never repeat an n-gram of this size (0: off)")
    priority: int = Field(0, ge=INT64_MIN, le=INT64_MAX, description="with --scheduling-policy priority, "
                                                                     "lower runs first")
    logits_processors: list[str] | None = Field(None, description="logits processors by import path; only those "
                                                                  "the server allows (--allowed-logits-processors)")
    cache_salt: str | None = Field(None, description="prefix-cache blocks are shared only among requests "
                                                     "of one salt (non-empty)")
    structured_outputs: dict[str, Any] | None = Field(
        None, description="the output constrained by exactly one of json (a schema), regex, choice, grammar "
                          "(EBNF) or json_object (true)")
    guided_json: str | dict[str, Any] | None = Field(None, description="the output as JSON of this schema")
    guided_regex: str | None = Field(None, description="the output as a match of this regular expression")
    guided_choice: list[str] | None = Field(None, description="the output as one of these strings")
    guided_grammar: str | None = Field(None, description="the output as a sentence of this EBNF grammar")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(
        description="a text, texts, a list of token ids, or lists of token ids")
    max_tokens: int | None = Field(DEFAULT_MAX_TOKENS, ge=1, le=INT64_MAX,
                                   description="most tokens to generate per choice (null: up to max_model_len)")
    logprobs: int | None = Field(None, ge=0, le=INT32_MAX, description="log-probabilities of this many "
                                                                          "most likely tokens per position")
    echo: bool = Field(False, description="start each choice's text with the prompt")
    suffix: str | None = Field(None, description="not supported")

    def prompts(self) -> list[dict[str, Any]]:
        """The engine's prompts, each with the request's cache_salt."""
        p = self.prompt
        if not p:
            raise ValueError("prompt must not be empty")
        prompts = [p] if isinstance(p, str) or isinstance(p[0], int) else p
        return [salted({"prompt": one} if isinstance(one, str) else {"prompt_token_ids": one}, self.cache_salt)
                for one in prompts]


class TextPart(Strict):
    type: Literal["text"] = Field(description="only text parts are supported")
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # tool_calls etc. reach the template
    role: str = Field(description="system, user, assistant, ...")
    content: str | list[TextPart] | None = Field(None, description="a text, or text parts joined into one")
    name: str | None = Field(None, description="the author's name, for the template")

    def for_template(self) -> dict[str, Any]:
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "".join(part.text for part in self.content)
        message.setdefault("content", "")
        for call in message.get("tool_calls") or ():
            # templates write arguments as JSON themselves: give them the object, as vLLM does
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                try:
                    function["arguments"] = json.loads(function["arguments"])
                except ValueError:
                    pass
        return message


class FunctionDefinition(Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$", description="the function's name")
    description: str | None = Field(None, description="what the function does, for the model")
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema of its arguments")
    strict: bool | None = Field(None, description="accepted; arguments always follow the schema when constrained")


class Tool(Strict):
    type: Literal["function"] = Field(description="only functions are supported")
    function: FunctionDefinition


class FunctionName(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, description="the conversation so far")
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX,
                                   description="deprecated by OpenAI for max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX,
                                              description="most tokens to generate per choice (null: up to "
                                                          "max_model_len)")
    logprobs: bool = Field(False, description="return the log-probability of each generated token")
    top_logprobs: int | None = Field(None, ge=0, le=INT32_MAX, description="and of this many most likely "
                                                                              "tokens per position")
    add_generation_prompt: bool = Field(True, description="end the prompt with the assistant's turn")
    continue_final_message: bool = Field(False, description="continue the last message instead")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="variables for the chat template")
    chat_template: str | None = Field(None, description="a chat template of the request's own: refused unless "
                                                        "the server trusts request templates")
    tools: list[Tool] | None = Field(None, description="functions the model may call")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="none, auto (the default with tools: the model decides), required (at least one "
                          "call), or a named function (a call of it)")
    parallel_tool_calls: bool = Field(True, description="with tool_choice required: more than one call allowed")


def salted(prompt: dict[str, Any], cache_salt: str | None) -> dict[str, Any]:
    return prompt if cache_salt is None else {**prompt, "cache_salt": cache_salt}


def to_sampling_params(request: CompletionRequest | ChatCompletionRequest,
                       allowed_logits_processors: Collection[str] = ()) -> SamplingParams:
    """SamplingParams of one engine request (n=1 of the server-level fan-out or the engine's own n).
    Raises ValueError with the offending field named. A logits processor runs code in the engine:
    a request may name only those in `allowed_logits_processors`."""
    if request.best_of is not None and request.best_of != request.n:
        raise ValueError(f"best_of is not supported (it must equal n={request.n}), got {request.best_of}")
    max_tokens, logprobs = _max_tokens_and_logprobs(request)
    refused = [p for p in request.logits_processors or () if p not in allowed_logits_processors]
    if refused:
        raise ValueError(f"logits_processors must name processors this server allows "
                         f"({sorted(allowed_logits_processors) or 'none'}), got {refused!r}")
    logit_bias = None
    if request.logit_bias is not None:
        try:
            logit_bias = {int(k): v for k, v in request.logit_bias.items()}
        except ValueError:
            raise ValueError(f"logit_bias keys must be token ids, got {list(request.logit_bias)!r}") from None
    optional = {name: getattr(request, name) for name in ("temperature", "top_p", "top_k", "min_p",
                                                           "repetition_penalty")
                if getattr(request, name) is not None}
    return SamplingParams(
        n=request.n,
        max_tokens=max_tokens,
        stop=request.stop or [],
        seed=request.seed,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        logit_bias=logit_bias,
        logprobs=logprobs,
        min_tokens=request.min_tokens,
        ignore_eos=request.ignore_eos,
        stop_token_ids=list(request.stop_token_ids or []),
        include_stop_str_in_output=request.include_stop_str_in_output,
        skip_special_tokens=request.skip_special_tokens,
        spaces_between_special_tokens=request.spaces_between_special_tokens,
        bad_words=request.bad_words,
        allowed_token_ids=request.allowed_token_ids,
        no_repeat_ngram_size=request.no_repeat_ngram_size,
        logits_processors=request.logits_processors,
        output_kind=RequestOutputKind.DELTA,
        structured_outputs=structured_outputs_of(request),
        **optional,
    )


GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}


def structured_outputs_of(request: CompletionRequest | ChatCompletionRequest) -> StructuredOutputsParams | None:
    """The one constraint of a request: response_format, structured_outputs, a guided_* field, or
    for a chat the tool_choice (required or a named function). Two of them are a ValueError."""
    given: dict[str, StructuredOutputsParams] = {}
    fmt = request.response_format
    if fmt is not None:
        given["response_format"] = _parsed("response_format", lambda: _response_format(fmt))
    if request.structured_outputs is not None:
        given["structured_outputs"] = _parsed("structured_outputs",
                                              lambda: StructuredOutputsParams(**request.structured_outputs))
    for field, kind in GUIDED_FIELDS.items():
        if (value := getattr(request, field)) is not None:
            given[field] = _parsed(field, lambda: StructuredOutputsParams(**{kind: value}))
    if isinstance(request, ChatCompletionRequest):
        if (constraint := tool_constraint(request)) is not None:
            given["tool_choice"] = constraint
    given = {field: c for field, c in given.items() if c is not None}
    if len(given) > 1:
        raise ValueError(f"{sorted(given)[0]} must be the only constraint of a request, got {sorted(given)}")
    return next(iter(given.values()), None)


def choice_of(request: ChatCompletionRequest) -> str | NamedToolChoice:
    """none, auto, required or the named function; auto by default where tools are given."""
    if request.tool_choice is None:
        return "auto" if request.tools else "none"
    return request.tool_choice


def tool_constraint(request: ChatCompletionRequest) -> StructuredOutputsParams | None:
    """What tool_choice constrains: required, the calls; a named function, its arguments (frontend/tool_calls.py)."""
    choice = choice_of(request)
    if choice == "none":
        return None
    tools = {tool.function.name: tool.function for tool in request.tools or ()}
    if not tools:
        raise ValueError(f"tool_choice must be none without tools, got {_describe(choice)}")
    if isinstance(choice, NamedToolChoice):
        function = tools.get(choice.function.name)
        if function is None:
            raise ValueError(f"tool_choice must name one of the tools {sorted(tools)}, got {choice.function.name!r}")
        return _parameters_constraint(function.parameters)
    if choice == "required":
        calls = {"type": "array", "minItems": 1, "items": {"anyOf": [
            {"type": "object", "properties": {"name": {"type": "string", "enum": [name]},
                                              "parameters": function.parameters or {"type": "object"}},
             "required": ["name", "parameters"]}
            for name, function in tools.items()]}}
        if not request.parallel_tool_calls:
            calls["maxItems"] = 1
        return StructuredOutputsParams(json=calls)
    return None  # auto: free text, read by tool_calls.parse_tool_calls


def _parameters_constraint(parameters: dict[str, Any] | None) -> StructuredOutputsParams:
    return StructuredOutputsParams(json=parameters) if parameters else StructuredOutputsParams(json_object=True)


def _describe(choice) -> str:
    return choice if isinstance(choice, str) else f"function {choice.function.name!r}"


def _parsed(field: str, make):
    try:
        return make()
    except TypeError as e:
        raise ValueError(f"{field} must hold only json, regex, choice, grammar or json_object: {e}") from None
    except ValueError as e:
        message = str(e)
        raise ValueError(message if message.startswith(field) else f"{field} is invalid: {message}") from None


def _response_format(fmt: dict[str, Any]) -> StructuredOutputsParams | None:
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema", spec.get("json_schema")) if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ValueError("response_format.json_schema.schema must be a JSON schema (an object), "
                             f"got {schema!r}")
        return StructuredOutputsParams(json=schema)
    raise ValueError(f"response_format.type must be text, json_object or json_schema, got {kind!r}")


def _max_tokens_and_logprobs(request: CompletionRequest | ChatCompletionRequest) -> tuple[int | None, int | None]:
    """The two fields a chat request names differently from a completion request, and the
    request-specific fields Conveyor refuses."""
    if isinstance(request, ChatCompletionRequest):
        if request.top_logprobs is not None and not request.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None \
            else request.max_tokens
        return max_tokens, (request.top_logprobs or 0) if request.logprobs else None
    if request.suffix is not None:
        raise ValueError("suffix is not supported")
    if request.echo and request.logprobs is not None:
        raise ValueError("echo together with logprobs is not supported")
    return request.max_tokens, request.logprobs


# ---- responses ----

class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobToken] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str = Field(default_factory=lambda: random_id("call"))
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


# ---- models, tokenize, detokenize ----

class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "conveyor"
    root: str | None = None
    parent: str | None = None  # a LoRA adapter's base model
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(Strict):
    model: str | None = Field(None, description="the served model name (any other is a 404)")
    prompt: str | None = Field(None, description="a text to tokenize (give it or messages)")
    messages: list[ChatMessage] | None = Field(None, description="a conversation to tokenize with the chat "
                                                                 "template")
    add_special_tokens: bool = Field(True, description="add the tokenizer's special tokens to a prompt")
    add_generation_prompt: bool = Field(True, description="end the messages with the assistant's turn")


class LoadLoRAAdapterRequest(Strict):
    lora_name: str = Field(min_length=1, description="the name requests give as their model")
    lora_path: str = Field(min_length=1, description="the adapter's PEFT directory, on the server's host")


class UnloadLoRAAdapterRequest(Strict):
    lora_name: str = Field(min_length=1, description="an adapter's name")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(Strict):
    model: str | None = Field(None, description="the served model name (any other is a 404)")
    tokens: list[TokenId] = Field(description="token ids to turn into text")


class DetokenizeResponse(BaseModel):
    prompt: str
