"""The OpenAI API's logic, apart from HTTP: requests become engine requests, engine outputs become
OpenAI bodies and server-sent events, and every error takes OpenAI's error shape.
`api_server.py` puts this behind FastAPI routes."""

import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from conveyor.frontend.errors import EngineDeadError
from conveyor.frontend.metrics import ServerMetrics
from conveyor.frontend.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from conveyor.frontend.parallel_sampling import YIELD_EVERY
from conveyor.frontend.protocol import (ChatChoice, ChatCompletionChunk, ChatCompletionRequest,
                                        ChatCompletionResponse, ChatLogprobs, ChatLogprobToken, ChatMessage,
                                        ChatResponseMessage, ChatStreamChoice, CompletionChoice,
                                        CompletionLogprobs, CompletionRequest, CompletionResponse,
                                        DeltaMessage, ErrorInfo, ErrorResponse, PromptTokensDetails, TopLogprob,
                                        TokenizeRequest, Usage, random_id, salted, to_sampling_params)
from conveyor.sampling_params import SamplingParams, resolve_max_tokens

logger = logging.getLogger(__name__)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 499: "client_disconnected",
               500: "internal_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> ErrorResponse:
    return ErrorResponse(error=ErrorInfo(message=message, type=ERROR_TYPES.get(status, "error"),
                                         param=param, code=code))


MIN_LOGPROB = -9999.0  # JSON has no -inf
SLOW_PROMPT_CHARS = 8192  # longer prompts are prepared on the slow lane (about 1 ms of tokenizing per 1,000)
# A token stands for at most as many characters as its vocabulary entry has (bytes, in byte-level
# BPE); twice that leaves room for normalizers that merge characters (NFC).
CHARS_PER_TOKEN_SLACK = 2
REQUEST_TEMPLATE_SECONDS = 2.0  # the longest a chat template from a request may render


class TemplateStopped(BaseException):
    """Raised inside a request's chat template: a BaseException, so no `except Exception` in the
    template engine can swallow it."""


class RenderBudget:
    """Stops code run under `run` at its next Python line or call once `seconds` have passed or
    `cancel()` was called (a trace function of the running thread: it costs a few times the speed)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def _trace(self, frame, event, arg):
        if self.cancelled:
            raise TemplateStopped("the request was cancelled")
        if time.monotonic() > self.deadline:
            raise TemplateStopped(f"the request's chat template took more than {self.seconds:g} seconds to render")
        return self._trace

    def run(self, fn: Callable[[], Any]) -> Any:
        previous = sys.gettrace()
        sys.settrace(self._trace)
        try:
            return fn()
        finally:
            sys.settrace(previous)


@dataclass(slots=True)
class Piece:
    """A delta of one choice; `index` counts across prompts and samples (prompt_index * n + sample)."""
    index: int
    prompt_index: int
    completion: CompletionOutput
    output: RequestOutput


@dataclass(slots=True)
class ChoiceText:
    text: str = ""
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, c: CompletionOutput) -> None:
        self.text += c.text
        self.logprobs += c.logprobs or ()
        if c.finish_reason is not None:
            self.finish_reason, self.stop_reason = c.finish_reason, c.stop_reason


class UsageCounter:
    def __init__(self):
        self.prompt: dict[int, int] = {}
        self.cached: dict[int, int] = {}
        self.completion = 0

    def add(self, piece: Piece) -> None:
        p = piece.prompt_index
        self.prompt[p] = len(piece.output.prompt_token_ids)
        self.cached[p] = max(self.cached.get(p, 0), piece.output.num_cached_tokens)
        self.completion += len(piece.completion.token_ids)

    def usage(self) -> Usage:
        prompt = sum(self.prompt.values())
        return Usage(prompt_tokens=prompt, completion_tokens=self.completion, total_tokens=prompt + self.completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self.cached.values())))


def sse(body: BaseModel) -> str:
    return f"data: {body.model_dump_json()}\n\n"


def sse_error(e: Exception) -> str:
    if isinstance(e, APIError):
        body = error_body(e.status, e.message, e.param, e.code)
    elif isinstance(e, EngineDeadError):
        body = error_body(503, e.summary, code="engine_dead")
    elif isinstance(e, ValueError):
        body = error_body(400, str(e))
    else:
        logger.exception("stream failed")
        body = error_body(500, f"internal error: {e!r}")
    return sse(body)


async def merge(streams: list[AsyncIterator[Piece]]) -> AsyncIterator[Piece]:
    """Interleave several engine streams; leaving early cancels (and so aborts) all of them."""
    queue: asyncio.Queue = asyncio.Queue(maxsize=len(streams))
    done = object()

    async def pump(stream: AsyncIterator[Piece]) -> None:
        try:
            async with aclosing(stream):
                async for piece in stream:
                    await queue.put(piece)
        except Exception as e:
            await queue.put(e)
            return
        await queue.put(done)

    tasks = []
    try:
        for i, stream in enumerate(streams):
            tasks.append(asyncio.create_task(pump(stream)))
            if i % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)  # the new streams add their requests, then others get the loop
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class OpenAIServing:
    """Turns OpenAI requests into engine requests and engine outputs into OpenAI bodies."""

    def __init__(self, engine, model_name: str, metrics: ServerMetrics,
                 allowed_logits_processors: Collection[str] = (), trust_request_chat_template: bool = False):
        self.engine = engine
        self.model_name = model_name
        self.metrics = metrics
        self.allowed_logits_processors = frozenset(allowed_logits_processors)
        self.trust_request_chat_template = trust_request_chat_template
        self._token_text: dict[int, str] = {}
        self._chars_per_token = 0
        # One thread for the prompts that take long to prepare (long ones, request templates), so
        # that the others (the engine's own input thread, the default executor) never queue behind them.
        self.slow_lane = ThreadPoolExecutor(max_workers=1, thread_name_prefix="conveyor-slow-prompts")

    async def _off_loop(self, fn: Callable[[], Any], slow: bool) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.slow_lane if slow else None, fn)

    # -- engine requests --

    def sampling_params(self, body: CompletionRequest | ChatCompletionRequest) -> SamplingParams:
        return to_sampling_params(body, self.allowed_logits_processors)

    async def generate(self, prompts: list, params: SamplingParams, priority: int,
                       request_id: str) -> AsyncIterator[Piece]:
        """Every choice's deltas, of every prompt (the engine runs the n samples of each)."""
        streams = [self._engine_stream(prompt, params, f"{request_id}-{p}", priority, p, p * params.n)
                   for p, prompt in enumerate(prompts)]
        pieces = streams[0] if len(streams) == 1 else merge(streams)
        async with aclosing(pieces):
            async for piece in pieces:
                yield piece

    async def _engine_stream(self, prompt, params: SamplingParams, request_id: str, priority: int,
                             prompt_index: int, base: int) -> AsyncIterator[Piece]:
        tokens: dict[int, int] = {}
        unfinished: set[int] = set()
        last: RequestOutput | None = None
        try:
            async for out in self.engine.generate(prompt, params, request_id, priority):
                last = out
                if out.error_code is not None:
                    raise APIError(out.error_code, out.error_message or "request failed")
                for c in out.outputs:
                    tokens[c.index] = tokens.get(c.index, 0) + len(c.token_ids)
                    if c.finish_reason is None:
                        unfinished.add(c.index)
                    else:
                        unfinished.discard(c.index)
                        self.metrics.observe_completion(c.finish_reason, tokens[c.index], out)
                    yield Piece(base + c.index, prompt_index, c, out)
            if last is not None:
                self.metrics.observe_finished(last)
        finally:
            for index in unfinished:  # left early: generate() aborted them in the engine
                self.metrics.observe_completion("abort", tokens[index], last)

    async def _collect(self, prompts, params, priority, request_id):
        choices: dict[int, ChoiceText] = {}
        outputs: dict[int, RequestOutput] = {}
        usage = UsageCounter()
        async with aclosing(self.generate(prompts, params, priority, request_id)) as pieces:
            async for piece in pieces:
                usage.add(piece)
                choices.setdefault(piece.index, ChoiceText()).add(piece.completion)
                outputs[piece.index] = piece.output
        return sorted(choices.items()), outputs, usage.usage()

    # -- prompts --

    def max_prompt_chars(self) -> int:
        """The most characters a prompt that fits in max_model_len tokens can have."""
        if not self._chars_per_token:
            self._chars_per_token = max(map(len, self.engine.tokenizer.get_vocab())) * CHARS_PER_TOKEN_SLACK
        return self.engine.max_model_len * self._chars_per_token

    def check_chars(self, length: int, param: str) -> None:
        if length > (limit := self.max_prompt_chars()):
            raise APIError(400, f"{param} is {length} characters long: more than fit in max_model_len "
                                f"({self.engine.max_model_len}) tokens ({limit} characters at most)", param)

    async def completion_prompts(self, body: CompletionRequest, params: SamplingParams) -> list:
        """The engine prompts of a completion request; a long text is tokenized here, on the slow
        lane, and checked against max_model_len there."""
        prompts = body.prompts()
        for prompt in prompts:
            text = prompt.get("prompt")
            if text is None:
                continue
            self.check_chars(len(text), "prompt")
            if len(text) > SLOW_PROMPT_CHARS:
                prompt["prompt_token_ids"] = await self._off_loop(lambda t=text: self._tokenized(t, params), slow=True)
        return prompts

    def _tokenized(self, text: str, params: SamplingParams) -> list[int]:
        ids = self.engine.tokenizer.encode(text)
        resolve_max_tokens(len(ids), params.max_tokens, self.engine.max_model_len)
        return ids

    async def tokenize(self, body: TokenizeRequest) -> list[int]:
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages")
        if body.messages is not None:
            return (await self.render_chat(body.messages, body.add_generation_prompt))[1]
        self.check_chars(len(body.prompt), "prompt")
        encode = self.engine.tokenizer.encode
        return await self._off_loop(lambda: encode(body.prompt, add_special_tokens=body.add_special_tokens),
                                    slow=len(body.prompt) > SLOW_PROMPT_CHARS)

    def request_template(self, body: ChatCompletionRequest) -> str | None:
        """The chat template the request brings, if the server trusts requests with one."""
        in_kwargs = (body.chat_template_kwargs or {}).get("chat_template")
        for param, template in (("chat_template", body.chat_template),
                                ("chat_template_kwargs.chat_template", in_kwargs)):
            if template is not None and not self.trust_request_chat_template:
                raise APIError(400, "this server renders only its own chat template: a template from the "
                                    "request needs a server started with --trust-request-chat-template", param)
        return body.chat_template if body.chat_template is not None else in_kwargs

    async def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                          continue_final_message: bool = False, kwargs: dict[str, Any] | None = None,
                          template: str | None = None) -> tuple[str, list[int]]:
        """The chat's text and its token ids. A `template` from the request renders within
        REQUEST_TEMPLATE_SECONDS (and stops when the client leaves); the text must fit in
        max_model_len by its characters before it is tokenized."""
        tokenizer = self.engine.tokenizer
        if template is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template: use /v1/completions")
        conversation = [m.for_template() for m in messages]
        chars = sum(len(m.get("content", "")) for m in conversation)
        self.check_chars(chars, "messages")
        extra = {k: v for k, v in (kwargs or {}).items() if k != "chat_template"}
        if continue_final_message:
            extra["continue_final_message"] = True
        if template is not None:
            extra["chat_template"] = template

        budget = RenderBudget(REQUEST_TEMPLATE_SECONDS) if template is not None else None

        def prepare() -> tuple[str, list[int]]:
            def render():
                return tokenizer.apply_chat_template(conversation, tokenize=False,
                                                     add_generation_prompt=add_generation_prompt, **extra)
            try:
                text = render() if budget is None else budget.run(render)
            except Exception as e:
                raise ValueError(f"cannot apply the chat template: {e}") from None
            if not isinstance(text, str):
                raise ValueError(f"cannot apply the chat template: it made a {type(text).__name__}, not text")
            self.check_chars(len(text), "messages")
            return text, tokenizer.encode(text, add_special_tokens=False)

        try:
            return await self._off_loop(prepare, slow=budget is not None or chars > SLOW_PROMPT_CHARS)
        except asyncio.CancelledError:
            if budget is not None:
                budget.cancel()  # the client left: stop rendering too
            raise
        except TemplateStopped as e:
            raise APIError(400, str(e), "chat_template") from None

    async def _chat_prompt(self, body: ChatCompletionRequest) -> dict:
        text, ids = await self.render_chat(body.messages, body.add_generation_prompt and not
                                           body.continue_final_message, body.continue_final_message,
                                           body.chat_template_kwargs, self.request_template(body))
        return salted({"prompt": text, "prompt_token_ids": ids}, body.cache_salt)

    def prompt_text(self, output: RequestOutput) -> str:
        if output.prompt is not None:
            return output.prompt
        return self.engine.tokenizer.decode(output.prompt_token_ids)

    # -- logprobs --

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.engine.tokenizer.decode([token_id])
        return text

    def completion_logprobs(self, positions: list[PositionLogprobs], offset: int) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for position in positions:
            chosen, entry = next(iter(position.items()))
            text = self.token_text(chosen)
            out.text_offset.append(offset)
            offset += len(text)
            out.tokens.append(text)
            out.token_logprobs.append(max(entry.logprob, MIN_LOGPROB))
            out.top_logprobs.append({self.token_text(t): max(lp.logprob, MIN_LOGPROB) for t, lp in position.items()})
        return out

    def chat_logprobs(self, positions: list[PositionLogprobs], top_n: int) -> ChatLogprobs:
        def top(token_id: int, logprob: float) -> dict:
            text = self.token_text(token_id)
            return {"token": text, "logprob": max(logprob, MIN_LOGPROB), "bytes": list(text.encode())}

        content = []
        for position in positions:
            chosen, entry = next(iter(position.items()))
            best = sorted((lp.rank, t, lp.logprob) for t, lp in position.items()
                          if lp.rank is not None and lp.rank <= top_n)
            content.append(ChatLogprobToken(**top(chosen, entry.logprob),
                                            top_logprobs=[TopLogprob(**top(t, lp)) for _, t, lp in best]))
        return ChatLogprobs(content=content)

    # -- completions --

    async def completion(self, body: CompletionRequest) -> CompletionResponse:
        params = self.sampling_params(body)
        prompts = await self.completion_prompts(body, params)
        request_id = random_id("cmpl")
        choices, outputs, usage = await self._collect(prompts, params, body.priority, request_id)
        return CompletionResponse(id=request_id, model=self.model_name, usage=usage, choices=[
            CompletionChoice(
                index=i, text=(self.prompt_text(outputs[i]) if body.echo else "") + c.text,
                logprobs=None if params.logprobs is None else self.completion_logprobs(c.logprobs, 0),
                finish_reason=c.finish_reason, stop_reason=c.stop_reason)
            for i, c in choices])

    async def completion_events(self, body: CompletionRequest) -> AsyncIterator[str]:
        params = self.sampling_params(body)
        prompts = await self.completion_prompts(body, params)
        request_id = random_id("cmpl")
        offsets = {}

        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
            return sse(CompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage))

        def render(piece) -> str | None:
            c, text = piece.completion, piece.completion.text
            if piece.index not in offsets:
                offsets[piece.index] = 0
                if body.echo:
                    text = self.prompt_text(piece.output) + text
            if not (text or c.finish_reason is not None or c.logprobs):
                return None
            logprobs = None
            if params.logprobs is not None:
                logprobs = self.completion_logprobs(c.logprobs or [], offsets[piece.index])
                offsets[piece.index] = (logprobs.text_offset[-1] + len(logprobs.tokens[-1])
                                        if logprobs.tokens else offsets[piece.index])
            return chunk([CompletionChoice(index=piece.index, text=text, logprobs=logprobs,
                                           finish_reason=c.finish_reason, stop_reason=c.stop_reason)])

        events = self._events(self.generate(prompts, params, body.priority, request_id), render, chunk,
                              body.include_usage)
        async with aclosing(events):  # a client that leaves closes this generator: close the request's too
            async for event in events:
                yield event

    async def _events(self, pieces: AsyncIterator, render, chunk, include_usage: bool,
                      opening: Iterable[str] = ()) -> AsyncIterator[str]:
        """A streamed response: `opening`, then each piece as `render` makes it (None: nothing to
        send), then usage if asked for, and [DONE]. Errors before the first output propagate, so
        they still get an HTTP status; later ones become an error event."""
        usage = UsageCounter()
        async with aclosing(pieces) as pieces:
            piece = await anext(pieces)
            try:
                for event in opening:
                    yield event
                while piece is not None:
                    usage.add(piece)
                    if (event := render(piece)) is not None:
                        yield event
                    piece = await anext(pieces, None)
                if include_usage:
                    yield chunk([], usage.usage())
            except Exception as e:
                yield sse_error(e)
        yield "data: [DONE]\n\n"

    # -- chat completions --

    async def chat(self, body: ChatCompletionRequest) -> ChatCompletionResponse:
        params = self.sampling_params(body)
        prompt = await self._chat_prompt(body)
        request_id = random_id("chatcmpl")
        choices, _, usage = await self._collect([prompt], params, body.priority, request_id)
        return ChatCompletionResponse(id=request_id, model=self.model_name, usage=usage, choices=[
            ChatChoice(index=i, message=ChatResponseMessage(content=c.text),
                       logprobs=None if params.logprobs is None else self.chat_logprobs(c.logprobs, params.logprobs),
                       finish_reason=c.finish_reason, stop_reason=c.stop_reason)
            for i, c in choices])

    async def chat_events(self, body: ChatCompletionRequest) -> AsyncIterator[str]:
        params = self.sampling_params(body)
        prompt = await self._chat_prompt(body)
        request_id = random_id("chatcmpl")

        def chunk(choices: list[ChatStreamChoice], usage: Usage | None = None) -> str:
            return sse(ChatCompletionChunk(id=request_id, model=self.model_name, choices=choices, usage=usage))

        def render(piece) -> str | None:
            c = piece.completion
            if not (c.text or c.finish_reason is not None or c.logprobs):
                return None
            logprobs = None if params.logprobs is None else self.chat_logprobs(c.logprobs or [], params.logprobs)
            return chunk([ChatStreamChoice(index=piece.index, delta=DeltaMessage(content=c.text), logprobs=logprobs,
                                           finish_reason=c.finish_reason, stop_reason=c.stop_reason)])

        # lazy: made once the first output shows the request (its n included) was accepted
        opening = (chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
                   for i in range(body.n))
        events = self._events(self.generate([prompt], params, body.priority, request_id), render, chunk,
                              body.include_usage, opening)
        async with aclosing(events):
            async for event in events:
                yield event
