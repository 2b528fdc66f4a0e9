"""OpenAI-compatible HTTP server over AsyncLLM.

    app = build_app(engine, "my-model", api_key=None)      # any ASGI server, or:
    conveyor serve path/to/model --port 8000                # run_server, uvicorn on uvloop

Routes: /v1/completions, /v1/chat/completions (both stream as server-sent events), /v1/models,
/tokenize, /detokenize, /health, /metrics, and FastAPI's /docs, /redoc, /openapi.json. With an API
key, every route but /health (and /metrics when `public_metrics`) answers 401 without it. A body
over `max_request_bytes` is 413. Every error is OpenAI's error JSON with its status.
A client that leaves (mid-stream or while waiting for a whole response) aborts its engine requests.
The OpenAI logic itself (bodies, streams, logprobs, usage) is `serving.py`'s.
"""

import asyncio
import contextlib
import logging
import secrets
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import aclosing, asynccontextmanager
from typing import Any, TypeVar

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor.config import RequestLimits
from conveyor.frontend.args import DEFAULT_MAX_REQUEST_BYTES, engine_args, startup_failure
from conveyor.frontend.async_llm import AsyncLLM
from conveyor.frontend.errors import EngineDeadError
from conveyor.frontend.metrics import ServerMetrics
from conveyor.frontend.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                        DetokenizeResponse, LoadLoRAAdapterRequest, ModelCard, ModelList,
                                        TokenizeRequest, TokenizeResponse, UnloadLoRAAdapterRequest)
from conveyor.frontend.serving import APIError, OpenAIServing, error_body, sse_error
from conveyor.lora import LoRARequest, lora_id_for_path

logger = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)


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


class RequireAPIKey:
    """401 for any HTTP request outside `open_paths` without 'Authorization: Bearer <key>'."""

    def __init__(self, app: ASGIApp, api_key: str, open_paths: frozenset[str]):
        self.app, self.key, self.open_paths = app, api_key.encode(), open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths and not self.authorized(scope):
            response = error_response(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                      code="invalid_api_key")
            return await response(scope, receive, send)
        await self.app(scope, receive, send)

    def authorized(self, scope: Scope) -> bool:
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.key)


class LimitRequestBody:
    """413 for a request body over `max_bytes`: by its Content-Length before reading it, or as
    soon as a chunked body grows past it. The app then reads the body from memory."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self.too_large()(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its whole body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self.too_large()(scope, receive, send)
            if not message.get("more_body", False):
                break
        first: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> Message:
            return first.pop() if first else await receive()

        await self.app(scope, replay, send)

    def too_large(self) -> JSONResponse:
        return error_response(413, f"the request body is larger than the server's limit of {self.max_bytes} bytes")


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
        return error_response(503, e.summary, code="engine_dead")

    @app.exception_handler(Exception)
    async def internal(_, e: Exception):
        logger.exception("request failed")
        return error_response(500, f"internal error: {e!r}")


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI operation's body: `model` as JSON (the route parses it itself, whatever the
    Content-Type, as curl -d sends form-encoded)."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def describe_bodies(app: FastAPI, models: tuple[type[BaseModel], ...], model_names: list[str],
                    limits: RequestLimits) -> None:
    """Put the schemas of the bodies that `json_body` names into /openapi.json, with the model names
    that exist (the served model's, its adapters') and this server's request limits."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            _, defs = models_json_schema([(m, "validation") for m in models],
                                         ref_template="#/components/schemas/{model}")
            for model in models:
                properties = defs["$defs"][model.__name__]["properties"]
                properties["model"]["anyOf"] = [{"type": "string", "enum": model_names}, {"type": "null"}]
                for field, limit in (("n", limits.max_n), ("best_of", limits.max_n),
                                     ("logprobs", limits.max_logprobs), ("top_logprobs", limits.max_logprobs)):
                    if field in properties:
                        _set_maximum(properties[field], limit)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
        return app.openapi_schema

    app.openapi = openapi


def _set_maximum(field_schema: dict[str, Any], maximum: int) -> None:
    for branch in field_schema.get("anyOf", [field_schema]):
        if branch.get("type") == "integer":
            branch["maximum"] = maximum


def build_app(engine, served_model_name: str, api_key: str | None = None, *, lifespan=None,
              public_metrics: bool = False, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
              trust_request_chat_template: bool = False,
              allowed_logits_processors: Collection[str] = (),
              request_limits: RequestLimits = RequestLimits(),
              lora_modules: Collection[LoRARequest] = (), allow_lora_updates: bool = False) -> FastAPI:
    """The OpenAI-compatible app over `engine` (an AsyncLLM). With `engine=None`, `lifespan` must set
    `app.state.serving.engine` before the first request.

    `public_metrics`: serve /metrics without the API key (for scrapers that send none).
    `trust_request_chat_template`: render a chat template a request brings (it is code).
    `allowed_logits_processors`: the only logits processors requests may name.
    `lora_modules`: adapters that a request's `model` may name instead of the served model.
    `allow_lora_updates`: serve /v1/load_lora_adapter and /v1/unload_lora_adapter (else 404)."""
    app = FastAPI(title="Conveyor", lifespan=lifespan)
    app.state.serving = OpenAIServing(engine, served_model_name, ServerMetrics(served_model_name),
                                      allowed_logits_processors,
                                      trust_request_chat_template=trust_request_chat_template,
                                      lora_modules=lora_modules, allow_lora_updates=allow_lora_updates)
    install_error_handlers(app)
    describe_bodies(app, (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest),
                    [served_model_name, *(lora.lora_name for lora in lora_modules)], request_limits)
    app.add_middleware(LimitRequestBody, max_bytes=max_request_bytes)
    if api_key is not None:
        open_paths = frozenset({"/health", "/metrics"} if public_metrics else {"/health"})
        app.add_middleware(RequireAPIKey, api_key=api_key, open_paths=open_paths)
    app.include_router(router)
    return app


# ---- the routes: each reads the app's OpenAIServing from request.app.state ----

router = APIRouter()


def serving_of(request: Request) -> OpenAIServing:
    return request.app.state.serving


async def parse(request: Request, model: type[T]) -> T:
    try:
        body = model.model_validate_json(await request.body())
    except ValidationError as e:
        raise APIError(400, *describe_validation_error(e)) from None
    serving_of(request).check_model(getattr(body, "model", None))
    return body


def live_engine(serving: OpenAIServing):
    if serving.engine is None or serving.engine.is_dead:
        raise APIError(503, "the engine is not running", code="engine_dead")
    return serving.engine


async def answer(request: Request, model: type[T], events: Callable[[OpenAIServing, T], AsyncIterator[str]],
                 whole: Callable[[OpenAIServing, T], Awaitable[BaseModel]]) -> Response:
    """A generation request's answer: its `events` as they come when it streams, else `whole`'s body."""
    body, serving = await parse(request, model), serving_of(request)
    live_engine(serving)
    if not body.stream:
        try:
            response = await until_disconnected(request, whole(serving, body))
        except asyncio.CancelledError:  # past the graceful-shutdown timeout (see EventStream)
            return error_response(503, "the server is shutting down")
        return Response(response.model_dump_json(), media_type="application/json")
    stream = events(serving, body)
    # Wait for the first event here, so that a rejected request still gets its HTTP status.
    first = await until_disconnected(request, anext(stream))
    return EventStream(prepend(first, stream), headers={"Cache-Control": "no-cache"})


@router.post("/v1/completions", openapi_extra=json_body(CompletionRequest))
async def completions(request: Request):
    return await answer(request, CompletionRequest, OpenAIServing.completion_events, OpenAIServing.completion)


@router.post("/v1/chat/completions", openapi_extra=json_body(ChatCompletionRequest))
async def chat_completions(request: Request):
    return await answer(request, ChatCompletionRequest, OpenAIServing.chat_events, OpenAIServing.chat)


def model_card(serving: OpenAIServing, name: str) -> ModelCard:
    """The served model's card, or an adapter's: its PEFT directory as root, the model as parent."""
    engine = serving.engine
    max_model_len = engine.max_model_len if engine else None
    if (lora := serving.lora_modules.get(name)) is not None:
        return ModelCard(id=name, root=lora.lora_path, parent=serving.model_name, max_model_len=max_model_len)
    return ModelCard(id=serving.model_name, root=engine.config.model if engine else None,
                     max_model_len=max_model_len)


@router.get("/v1/models")
async def models(request: Request):
    serving = serving_of(request)
    names = [serving.model_name, *serving.lora_modules]
    return ModelList(data=[model_card(serving, name) for name in names]).model_dump()


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request):
    serving_of(request).check_model(model_id)
    return model_card(serving_of(request), model_id).model_dump()


def lora_updates(request: Request) -> OpenAIServing:
    serving = serving_of(request)
    if not serving.allow_lora_updates:
        raise APIError(404, "LoRA adapters are loaded at start (--lora-modules); run the server with "
                            "--allow-lora-updates to load them at run time", code="not_found")
    live_engine(serving)
    return serving


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(request: Request):
    serving = lora_updates(request)
    body = await parse(request, LoadLoRAAdapterRequest)
    serving.load_lora_adapter(body.lora_name, body.lora_path)
    return Response(f"LoRA adapter {body.lora_name!r} loaded", media_type="text/plain")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(request: Request):
    serving = lora_updates(request)
    body = await parse(request, UnloadLoRAAdapterRequest)
    serving.unload_lora_adapter(body.lora_name)
    return Response(f"LoRA adapter {body.lora_name!r} unloaded", media_type="text/plain")


@router.post("/tokenize", openapi_extra=json_body(TokenizeRequest))
async def tokenize(request: Request):
    body, serving = await parse(request, TokenizeRequest), serving_of(request)
    engine = live_engine(serving)
    ids = await until_disconnected(request, serving.tokenize(body))
    return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids).model_dump()


@router.post("/detokenize", openapi_extra=json_body(DetokenizeRequest))
async def detokenize(request: Request):
    body = await parse(request, DetokenizeRequest)
    engine = live_engine(serving_of(request))
    vocab = engine.hf_config.vocab_size
    if any(not 0 <= t < vocab for t in body.tokens):
        raise APIError(400, f"tokens must be ids in [0, {vocab})", "tokens")
    return DetokenizeResponse(prompt=engine.tokenizer.decode(body.tokens)).model_dump()


@router.get("/health")
async def health(request: Request):
    live_engine(serving_of(request))
    return Response(status_code=200)


@router.get("/metrics")
async def metrics(request: Request):
    serving = serving_of(request)
    await serving.metrics.refresh(serving.engine)
    return Response(serving.metrics.render(), media_type=serving.metrics.content_type)


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
    """Start the engine, then serve until SIGINT/SIGTERM: stop accepting, let in-flight requests
    finish within `args.shutdown_timeout` seconds, abort the rest, shut the engine down. Returns the
    exit status: non-zero when the engine died, or failed to start (reported in one line on stderr).

    `engine_address`: use the engine core running there instead of starting one. `sockets`: accept
    on these listening sockets (shared with other API servers) instead of binding --host/--port."""
    try:
        engine = AsyncLLM(engine_address=engine_address, **engine_args(args))
    except Exception as exc:
        return startup_failure("serve", exc)
    try:
        # ids from the paths: every API server of a shared engine gives an adapter the same one
        lora_modules = [LoRARequest(name, lora_id_for_path(path), path)
                        for name, path in getattr(args, "lora_modules", None) or []]
        names = [args.served_model_name or args.model, *(lora.lora_name for lora in lora_modules)]
        if len(set(names)) < len(names):
            raise ValueError(f"lora_modules must have names of their own, distinct from the model's, got {names}")
        for lora in lora_modules:
            engine.resolve_lora(lora)  # an adapter that does not fit the model stops the start
    except Exception as exc:
        engine.shutdown()
        return startup_failure("serve", exc)
    server: _Server | None = None
    died = False

    async def watch() -> None:
        nonlocal died
        while not engine.is_dead:
            await asyncio.sleep(0.5)
        died = True
        logger.error("%s; shutting the server down", engine.client.failure)
        server.should_exit = True

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        watcher = asyncio.create_task(watch())
        try:
            yield
        finally:
            watcher.cancel()

    try:
        app = build_app(engine, args.served_model_name or args.model, args.api_key, lifespan=lifespan,
                        public_metrics=args.public_metrics, max_request_bytes=args.max_request_body,
                        trust_request_chat_template=args.trust_request_chat_template,
                        allowed_logits_processors=getattr(args, "allowed_logits_processors", None) or (),
                        request_limits=engine.config.request_limits, lora_modules=lora_modules,
                        allow_lora_updates=getattr(args, "allow_lora_updates", False))
        config = uvicorn.Config(app, host=args.host, port=args.port, loop="uvloop",
                                timeout_graceful_shutdown=args.shutdown_timeout,
                                log_level=getattr(args, "log_level", "info"), access_log=False)
        server = _Server(config)
        server.run(sockets=sockets)
    finally:
        died = died or engine.is_dead
        engine.shutdown()
    return 1 if died else 0
