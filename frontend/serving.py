"""The OpenAI API's logic, apart from HTTP: requests become engine requests, engine outputs become
OpenAI bodies and server-sent events, and every error takes OpenAI's error shape.
`api_server.py` puts this behind FastAPI routes; `prompts.py` prepares the prompts."""

import asyncio
import logging
from collections.abc import AsyncIterator, Collection, Iterable
from contextlib import aclosing
from dataclasses import dataclass, field

from pydantic import BaseModel

from conveyor.frontend.errors import EngineDeadError
from conveyor.frontend.metrics import ServerMetrics
from conveyor.frontend.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from conveyor.frontend.parallel_sampling import YIELD_EVERY
from conveyor.frontend.prompts import PromptPreparer
from conveyor.frontend.tool_calls import ToolCallStream, message_calls, tool_finish_reason
from conveyor.frontend.protocol import (APIError, ChatChoice, ChatCompletionChunk, ChatCompletionRequest,
                                        ChatCompletionResponse, ChatLogprobs, ChatLogprobToken,
                                        ChatResponseMessage, ChatStreamChoice, CompletionChoice,
                                        CompletionLogprobs, CompletionRequest, CompletionResponse,
                                        DeltaMessage, ErrorInfo, ErrorResponse, PromptTokensDetails, TopLogprob,
                                        TokenizeRequest, Usage, random_id, to_sampling_params)
from conveyor.lora import LoRARequest, lora_id_for_path
from conveyor.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 499: "client_disconnected",
               500: "internal_error", 503: "service_unavailable"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> ErrorResponse:
    return ErrorResponse(error=ErrorInfo(message=message, type=ERROR_TYPES.get(status, "error"),
                                         param=param, code=code))


MIN_LOGPROB = -9999.0  # JSON has no -inf


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
                 allowed_logits_processors: Collection[str] = (), trust_request_chat_template: bool = False,
                 lora_modules: Collection[LoRARequest] = (), allow_lora_updates: bool = False):
        self.engine = engine
        self.model_name = model_name
        self.lora_modules = {lora.lora_name: lora for lora in lora_modules}  # served under their names
        self.allow_lora_updates = allow_lora_updates  # /v1/load_lora_adapter, /v1/unload_lora_adapter
        self.metrics = metrics
        self.allowed_logits_processors = frozenset(allowed_logits_processors)
        self.prompts = PromptPreparer(trust_request_chat_template)
        self._token_text: dict[int, str] = {}

    def check_model(self, name: str | None) -> None:
        """A request may name only the served model or one of its adapters; any other is OpenAI's 404."""
        if name is not None and name != self.model_name and name not in self.lora_modules:
            raise APIError(404, f"The model `{name}` does not exist.", "model", "model_not_found")

    def lora_of(self, body) -> LoRARequest | None:
        """The adapter a (checked) body's `model` names, or None for the base model."""
        return self.lora_modules.get(body.model)

    def response_model(self, body) -> str:
        return body.model if body.model in self.lora_modules else self.model_name

    def load_lora_adapter(self, name: str, path: str) -> None:
        """Serve the adapter at `path` as `name`, under its path's id (`lora_id_for_path`)."""
        if name == self.model_name or name in self.lora_modules:
            raise APIError(400, f"The model `{name}` exists already.", "lora_name")
        try:
            lora = LoRARequest(name, lora_id_for_path(path), path)
            self.engine.resolve_lora(lora)
        except ValueError as e:
            raise APIError(400, str(e), "lora_path") from None
        self.lora_modules[name] = lora

    def unload_lora_adapter(self, name: str) -> None:
        if self.lora_modules.pop(name, None) is None:
            raise APIError(404, f"The LoRA adapter `{name}` does not exist.", "lora_name", "model_not_found")

    # -- engine requests --

    def sampling_params(self, body: CompletionRequest | ChatCompletionRequest) -> SamplingParams:
        return to_sampling_params(body, self.allowed_logits_processors)

    async def generate(self, prompts: list, params: SamplingParams, priority: int,
                       request_id: str, lora: LoRARequest | None = None) -> AsyncIterator[Piece]:
        """Every choice's deltas, of every prompt (the engine runs the n samples of each)."""
        streams = [self._engine_stream(prompt, params, f"{request_id}-{p}", priority, p, p * params.n, lora)
                   for p, prompt in enumerate(prompts)]
        pieces = streams[0] if len(streams) == 1 else merge(streams)
        async with aclosing(pieces):
            async for piece in pieces:
                yield piece

    async def _engine_stream(self, prompt, params: SamplingParams, request_id: str, priority: int,
                             prompt_index: int, base: int, lora: LoRARequest | None) -> AsyncIterator[Piece]:
        tokens: dict[int, int] = {}
        unfinished: set[int] = set()
        last: RequestOutput | None = None
        try:
            async for out in self.engine.generate(prompt, params, request_id, priority, lora):
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

    async def _collect(self, prompts, params, priority, request_id, lora):
        choices: dict[int, ChoiceText] = {}
        outputs: dict[int, RequestOutput] = {}
        usage = UsageCounter()
        async with aclosing(self.generate(prompts, params, priority, request_id, lora)) as pieces:
            async for piece in pieces:
                usage.add(piece)
                choices.setdefault(piece.index, ChoiceText()).add(piece.completion)
                outputs[piece.index] = piece.output
        return sorted(choices.items()), outputs, usage.usage()

    # -- prompts --

    async def tokenize(self, body: TokenizeRequest) -> list[int]:
        return await self.prompts.tokenize(self.engine, body)

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
        prompts = await self.prompts.completion_prompts(self.engine, body, params)
        request_id, lora = random_id("cmpl"), self.lora_of(body)
        choices, outputs, usage = await self._collect(prompts, params, body.priority, request_id, lora)
        return CompletionResponse(id=request_id, model=self.response_model(body), usage=usage, choices=[
            CompletionChoice(
                index=i, text=(self.prompt_text(outputs[i]) if body.echo else "") + c.text,
                logprobs=None if params.logprobs is None else self.completion_logprobs(c.logprobs, 0),
                finish_reason=c.finish_reason, stop_reason=c.stop_reason)
            for i, c in choices])

    async def completion_events(self, body: CompletionRequest) -> AsyncIterator[str]:
        params = self.sampling_params(body)
        prompts = await self.prompts.completion_prompts(self.engine, body, params)
        request_id, lora = random_id("cmpl"), self.lora_of(body)
        offsets = {}

        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
            return sse(CompletionResponse(id=request_id, model=self.response_model(body), choices=choices, usage=usage))

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

        events = self._events(self.generate(prompts, params, body.priority, request_id, lora), render, chunk,
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
        prompt = await self.prompts.chat_prompt(self.engine, body)
        request_id, lora = random_id("chatcmpl"), self.lora_of(body)
        choices, _, usage = await self._collect([prompt], params, body.priority, request_id, lora)
        out = []
        for i, c in choices:
            content, calls = message_calls(body, c.text)
            out.append(ChatChoice(
                index=i, message=ChatResponseMessage(content=content, tool_calls=calls),
                logprobs=None if params.logprobs is None else self.chat_logprobs(c.logprobs, params.logprobs),
                finish_reason=tool_finish_reason(body, c.finish_reason, bool(calls)), stop_reason=c.stop_reason))
        return ChatCompletionResponse(id=request_id, model=self.response_model(body), usage=usage, choices=out)

    async def chat_events(self, body: ChatCompletionRequest) -> AsyncIterator[str]:
        params = self.sampling_params(body)
        prompt = await self.prompts.chat_prompt(self.engine, body)
        request_id, lora = random_id("chatcmpl"), self.lora_of(body)

        def chunk(choices: list[ChatStreamChoice], usage: Usage | None = None) -> str:
            return sse(ChatCompletionChunk(id=request_id, model=self.response_model(body), choices=choices,
                                           usage=usage))

        tool_streams: dict[int, ToolCallStream] = {}

        def render(piece) -> str | None:
            c = piece.completion
            tools = tool_streams.get(piece.index)
            if tools is None:
                tools = tool_streams[piece.index] = ToolCallStream(body)
            content, calls = tools.add(c.text, c.finish_reason is not None)
            if not (content or calls or c.finish_reason is not None or c.logprobs):
                return None
            logprobs = None if params.logprobs is None else self.chat_logprobs(c.logprobs or [], params.logprobs)
            delta = DeltaMessage(content=None if calls and not content else content or "", tool_calls=calls)
            return chunk([ChatStreamChoice(index=piece.index, delta=delta, logprobs=logprobs,
                                           finish_reason=tools.finish_reason(c.finish_reason),
                                           stop_reason=c.stop_reason)])

        # lazy: made once the first output shows the request (its n included) was accepted
        opening = (chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
                   for i in range(body.n))
        events = self._events(self.generate([prompt], params, body.priority, request_id, lora), render, chunk,
                              body.include_usage, opening)
        async with aclosing(events):
            async for event in events:
                yield event
