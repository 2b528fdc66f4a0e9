"""OpenAI-compatible HTTP server over AsyncLLM.

    app = build_app(engine, "my-model", api_key=None)      # any ASGI server, or:
    conveyor serve path/to/model --port 8000                # run_server, uvicorn on uvloop

Routes: /v1/completions, /v1/chat/completions (both stream as server-sent events), /v1/models,
/tokenize, /detokenize, /health, /metrics. Every error is OpenAI's error JSON with its status.
A client that leaves (mid-stream or while waiting for a whole response) aborts its engine requests.
"""

import asyncio
import contextlib
import logging
import secrets
import signal
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from conveyor.frontend.errors import EngineDeadError
from conveyor.frontend.metrics import ServerMetrics
from conveyor.frontend.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from conveyor.frontend.protocol import (ChatChoice, ChatCompletionChunk, ChatCompletionRequest,
                                        ChatCompletionResponse, ChatLogprobs, ChatLogprobToken, ChatMessage,
                                        ChatResponseMessage, ChatStreamChoice, CompletionChoice,
                                        CompletionLogprobs, CompletionRequest, CompletionResponse,
                                        DeltaMessage, DetokenizeRequest, DetokenizeResponse, ErrorInfo,
                                        ErrorResponse, ModelCard, ModelList, PromptTokensDetails,
                                        TokenizeRequest, TokenizeResponse, TopLogprob, Usage, random_id,
                                        to_sampling_params)
from conveyor.frontend.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 499: "client_disconnected", 500: "internal_error",
               503: "service_unavailable"}
T = TypeVar("T", bound=BaseModel)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> ErrorResponse:
    return ErrorResponse(error=ErrorInfo(message=message, type=ERROR_TYPES.get(status, "error"),
                                         param=param, code=code))


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code).model_dump(), status_code=status)


def describe_validation_error(e: ValidationError | RequestValidationError) -> tuple[str, str | None]:
    errors = e.errors()
    parts = []
    for err in errors[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    first = errors[0].get("loc", ()) if errors else ()
    param = next((str(p) for p in first if p != "body"), None)
    return "; ".join(parts) or "invalid request", param


class EventStream(StreamingResponse):
    """Server-sent events whose generator is closed however the response ends, so that a client
    that leaves always aborts its engine requests."""
    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except asyncio.CancelledError:
            # uvicorn cancels what still runs when the graceful-shutdown timeout has passed: close the
            # generator (aborting its requests), then end the stream in the protocol's own terms.
            await self.body_iterator.aclose()
            with contextlib.suppress(Exception):
                end = sse_error(APIError(503, "the server is shutting down")) + "data: [DONE]\n\n"
                await send({"type": "http.response.body", "body": end.encode(), "more_body": False})
        finally:
            await self.body_iterator.aclose()


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work` unless the client disconnects first; then cancel it (aborting its requests)."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise APIError(499, "client disconnected")
    finally:
        for t in (task, watch):
            t.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)


# ---- generation ----

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
        body = error_body(503, str(e), code="engine_dead")
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

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
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

    def __init__(self, engine, model_name: str, metrics: ServerMetrics):
        self.engine = engine
        self.model_name = model_name
        self.metrics = metrics
        self._token_text: dict[int, str] = {}

    # -- engine requests --

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

    async def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                          continue_final_message: bool = False,
                          kwargs: dict[str, Any] | None = None) -> tuple[str, list[int]]:
        tokenizer = self.engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template: use /v1/completions")
        conversation = [m.for_template() for m in messages]
        extra = dict(kwargs or {})
        if continue_final_message:
            extra["continue_final_message"] = True

        def render() -> tuple[str, list[int]]:
            text = tokenizer.apply_chat_template(conversation, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt, **extra)
            return text, tokenizer.encode(text, add_special_tokens=False)

        try:
            return await asyncio.to_thread(render)
        except Exception as e:
            raise ValueError(f"cannot apply the chat template: {e}") from None

    async def _chat_prompt(self, body: ChatCompletionRequest) -> dict:
        text, ids = await self.render_chat(body.messages, body.add_generation_prompt and not
                                           body.continue_final_message, body.continue_final_message,
                                           body.chat_template_kwargs)
        return {"prompt": text, "prompt_token_ids": ids}

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
        params, prompts = to_sampling_params(body), body.prompts()
        request_id = random_id("cmpl")
        choices, outputs, usage = await self._collect(prompts, params, body.priority, request_id)
        return CompletionResponse(id=request_id, model=self.model_name, usage=usage, choices=[
            CompletionChoice(
                index=i, text=(self.prompt_text(outputs[i]) if body.echo else "") + c.text,
                logprobs=None if params.logprobs is None else self.completion_logprobs(c.logprobs, 0),
                finish_reason=c.finish_reason, stop_reason=c.stop_reason)
            for i, c in choices])

    async def completion_events(self, body: CompletionRequest) -> AsyncIterator[str]:
        params, prompts = to_sampling_params(body), body.prompts()
        request_id = random_id("cmpl")
        usage, offsets = UsageCounter(), {}

        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
            return sse(CompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage))

        async with aclosing(self.generate(prompts, params, body.priority, request_id)) as pieces:
            piece = await anext(pieces)  # errors until the first output get an HTTP status
            try:
                while piece is not None:
                    usage.add(piece)
                    c = piece.completion
                    text = c.text
                    if piece.index not in offsets:
                        offsets[piece.index] = 0
                        if body.echo:
                            text = self.prompt_text(piece.output) + text
                    if text or c.finish_reason is not None or c.logprobs:
                        logprobs = None
                        if params.logprobs is not None:
                            logprobs = self.completion_logprobs(c.logprobs or [], offsets[piece.index])
                            offsets[piece.index] = (logprobs.text_offset[-1] + len(logprobs.tokens[-1])
                                                    if logprobs.tokens else offsets[piece.index])
                        yield chunk([CompletionChoice(index=piece.index, text=text, logprobs=logprobs,
                                                      finish_reason=c.finish_reason, stop_reason=c.stop_reason)])
                    piece = await anext(pieces, None)
                if body.include_usage:
                    yield chunk([], usage.usage())
            except Exception as e:
                yield sse_error(e)
        yield "data: [DONE]\n\n"

    # -- chat completions --

    async def chat(self, body: ChatCompletionRequest) -> ChatCompletionResponse:
        params = to_sampling_params(body)
        prompt = await self._chat_prompt(body)
        request_id = random_id("chatcmpl")
        choices, _, usage = await self._collect([prompt], params, body.priority, request_id)
        return ChatCompletionResponse(id=request_id, model=self.model_name, usage=usage, choices=[
            ChatChoice(index=i, message=ChatResponseMessage(content=c.text),
                       logprobs=None if params.logprobs is None else self.chat_logprobs(c.logprobs, params.logprobs),
                       finish_reason=c.finish_reason, stop_reason=c.stop_reason)
            for i, c in choices])

    async def chat_events(self, body: ChatCompletionRequest) -> AsyncIterator[str]:
        params = to_sampling_params(body)
        prompt = await self._chat_prompt(body)
        request_id = random_id("chatcmpl")
        usage = UsageCounter()

        def chunk(choices: list[ChatStreamChoice], usage: Usage | None = None) -> str:
            return sse(ChatCompletionChunk(id=request_id, model=self.model_name, choices=choices, usage=usage))

        async with aclosing(self.generate([prompt], params, body.priority, request_id)) as pieces:
            piece = await anext(pieces)  # errors until the first output get an HTTP status
            try:
                for index in range(body.n):
                    yield chunk([ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))])
                while piece is not None:
                    usage.add(piece)
                    c = piece.completion
                    if c.text or c.finish_reason is not None or c.logprobs:
                        logprobs = None
                        if params.logprobs is not None:
                            logprobs = self.chat_logprobs(c.logprobs or [], params.logprobs)
                        yield chunk([ChatStreamChoice(index=piece.index, delta=DeltaMessage(content=c.text),
                                                      logprobs=logprobs, finish_reason=c.finish_reason,
                                                      stop_reason=c.stop_reason)])
                    piece = await anext(pieces, None)
                if body.include_usage:
                    yield chunk([], usage.usage())
            except Exception as e:
                yield sse_error(e)
        yield "data: [DONE]\n\n"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return error_response(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def request_validation(_, e: RequestValidationError):
        return error_response(400, *describe_validation_error(e))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(ValueError)
    async def bad_value(_, e: ValueError):
        return error_response(400, str(e))

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_, e: EngineDeadError):
        return error_response(503, str(e), code="engine_dead")

    @app.exception_handler(Exception)
    async def internal(_, e: Exception):
        logger.exception("request failed")
        return error_response(500, f"internal error: {e!r}")


def build_app(engine, served_model_name: str, api_key: str | None = None, *, lifespan=None) -> FastAPI:
    """The OpenAI-compatible app over `engine` (an AsyncLLM). With `engine=None`, `lifespan` must set
    `app.state.serving.engine` before the first request (run_server does)."""
    app = FastAPI(title="Conveyor", lifespan=lifespan)
    serving = OpenAIServing(engine, served_model_name, ServerMetrics(served_model_name))
    app.state.serving = serving
    install_error_handlers(app)

    async def parse(request: Request, model: type[T]) -> T:
        try:
            body = model.model_validate_json(await request.body())
        except ValidationError as e:
            raise APIError(400, *describe_validation_error(e)) from None
        name = getattr(body, "model", None)
        if name is not None and name != served_model_name:
            raise APIError(404, f"The model `{name}` does not exist.", "model", "model_not_found")
        return body

    def live_engine():
        if serving.engine is None or serving.engine.is_dead:
            raise APIError(503, "the engine is not running", code="engine_dead")
        return serving.engine

    async def check_api_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def respond(request: Request, events: AsyncIterator[str] | None, whole: Awaitable | None):
        if whole is not None:
            try:
                body = await until_disconnected(request, whole)
            except asyncio.CancelledError:  # past the graceful-shutdown timeout (see EventStream)
                return error_response(503, "the server is shutting down")
            return Response(body.model_dump_json(), media_type="application/json")
        # Wait for the first event here, so that a rejected request still gets its HTTP status.
        first = await until_disconnected(request, anext(events))
        return EventStream(prepend(first, events), headers={"Cache-Control": "no-cache"})

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @v1.post("/completions")
    async def completions(request: Request):
        body = await parse(request, CompletionRequest)
        live_engine()
        if body.stream:
            return await respond(request, serving.completion_events(body), None)
        return await respond(request, None, serving.completion(body))

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        body = await parse(request, ChatCompletionRequest)
        live_engine()
        if body.stream:
            return await respond(request, serving.chat_events(body), None)
        return await respond(request, None, serving.chat(body))

    def model_card() -> ModelCard:
        engine = serving.engine
        return ModelCard(id=served_model_name, root=engine.config.model if engine else None,
                         max_model_len=engine.max_model_len if engine else None)

    @v1.get("/models")
    async def models():
        return ModelList(data=[model_card()]).model_dump()

    @v1.get("/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != served_model_name:
            raise APIError(404, f"The model `{model_id}` does not exist.", "model", "model_not_found")
        return model_card().model_dump()

    app.include_router(v1)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await parse(request, TokenizeRequest)
        engine = live_engine()
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages")
        if body.messages is not None:
            _, ids = await serving.render_chat(body.messages, body.add_generation_prompt)
        else:
            ids = await asyncio.to_thread(engine.tokenizer.encode, body.prompt,
                                          add_special_tokens=body.add_special_tokens)
        return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids).model_dump()

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await parse(request, DetokenizeRequest)
        engine = live_engine()
        vocab = engine.hf_config.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"tokens must be ids in [0, {vocab})", "tokens")
        return DetokenizeResponse(prompt=engine.tokenizer.decode(body.tokens)).model_dump()

    @app.get("/health")
    async def health():
        live_engine()
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics():
        await serving.metrics.refresh(serving.engine)
        return Response(serving.metrics.render(), media_type=serving.metrics.content_type)

    return app


async def prepend(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    async with aclosing(rest):
        yield first
        async for item in rest:
            yield item


# ---- running it ----

class _Server(uvicorn.Server):
    """uvicorn, minus its re-raising of the caught SIGINT/SIGTERM after a graceful shutdown (the exit
    status is ours to choose)."""

    @contextlib.contextmanager
    def capture_signals(self):
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def run_server(args: Any, engine_address: str | None = None, sockets: list | None = None) -> int:
    """Serve until SIGINT/SIGTERM: stop accepting, let in-flight requests finish within
    `args.shutdown_timeout` seconds, abort the rest, shut the engine down. Returns the exit status:
    non-zero when the engine died.

    `engine_address`: use the engine core running there instead of starting one. `sockets`: accept
    on these listening sockets (shared with other API servers) instead of binding --host/--port."""
    from conveyor.frontend.async_llm import AsyncLLM
    from conveyor.frontend.cli import engine_args

    server: _Server | None = None
    died = False

    async def watch(engine) -> None:
        nonlocal died
        while not engine.is_dead:
            await asyncio.sleep(0.5)
        died = True
        logger.error("%s; shutting the server down", engine.client.dead)
        server.should_exit = True

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = AsyncLLM(args.model, engine_address=engine_address, **engine_args(args))
        app.state.serving.engine = engine
        watcher = asyncio.create_task(watch(engine))
        try:
            yield
        finally:
            watcher.cancel()
            engine.shutdown()

    app = build_app(None, args.served_model_name or args.model, args.api_key, lifespan=lifespan)
    config = uvicorn.Config(app, host=args.host, port=args.port, loop="uvloop",
                            timeout_graceful_shutdown=args.shutdown_timeout,
                            log_level=getattr(args, "log_level", "info"), access_log=False)
    server = _Server(config)
    try:
        server.run(sockets=sockets)
    finally:
        engine = app.state.serving.engine
        if engine is not None:
            died = died or engine.is_dead
            engine.shutdown()
    return 1 if died or app.state.serving.engine is None else 0
