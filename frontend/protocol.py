"""OpenAI-compatible request and response bodies, and the mapping of a request to SamplingParams.

Requests are validated strictly (a string where a number belongs is a 400, not a coercion). Unknown
fields are ignored; the OpenAI fields that would change the output and that Conveyor does not
implement (best_of != n, suffix, tools, a non-text response_format) are refused with a 400.
"""

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from conveyor.frontend.sampling_params import RequestOutputKind, SamplingParams


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


# ---- errors ----

class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ---- shared request fields ----

class StreamOptions(Strict):
    include_usage: bool = False


class SamplingFields(Strict):
    """What completions and chat completions share, OpenAI's fields first, then extensions."""
    model: str | None = None
    n: int = 1
    best_of: int | None = None
    stop: str | list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: dict[str, Any] | None = None
    # extensions (vLLM's names)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    no_repeat_ngram_size: int = 0
    priority: int = 0
    cache_salt: str | None = None  # prefix-cache blocks are shared only among requests of one salt

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    def prompts(self) -> list[dict[str, Any]]:
        """The engine's prompts, each with the request's cache_salt."""
        p = self.prompt
        if not p:
            raise ValueError("prompt must not be empty")
        prompts = [p] if isinstance(p, str) or isinstance(p[0], int) else p
        return [salted({"prompt": one} if isinstance(one, str) else {"prompt_token_ids": one}, self.cache_salt)
                for one in prompts]


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # tool_calls etc. reach the template
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    def for_template(self) -> dict[str, Any]:
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "".join(part.text for part in self.content)
        message.setdefault("content", "")
        return message


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None


def salted(prompt: dict[str, Any], cache_salt: str | None) -> dict[str, Any]:
    return prompt if cache_salt is None else {**prompt, "cache_salt": cache_salt}


def to_sampling_params(request: CompletionRequest | ChatCompletionRequest) -> SamplingParams:
    """SamplingParams of one engine request (n=1 of the server-level fan-out or the engine's own n).
    Raises ValueError with the offending field named."""
    if request.best_of is not None and request.best_of != request.n:
        raise ValueError(f"best_of is not supported (it must equal n={request.n}), got {request.best_of}")
    if request.response_format is not None and request.response_format.get("type") != "text":
        raise ValueError(f"response_format {request.response_format!r} is not supported (only text)")
    if isinstance(request, ChatCompletionRequest):
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None \
            else request.max_tokens
        if request.top_logprobs is not None and not request.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        if request.tools:
            raise ValueError("tools are not supported")
    else:
        max_tokens = request.max_tokens
        logprobs = request.logprobs
        if request.suffix is not None:
            raise ValueError("suffix is not supported")
        if request.echo and request.logprobs is not None:
            raise ValueError("echo together with logprobs is not supported")
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
        output_kind=RequestOutputKind.DELTA,
        **optional,
    )


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


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None


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
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
