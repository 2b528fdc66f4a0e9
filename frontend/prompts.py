"""The OpenAI server's prompts: chat templates rendered, texts tokenized, and every prompt checked
against max_model_len, first by its characters (before any tokenizing), then by its tokens.

Long texts and the chat templates that requests bring are prepared on a slow lane of their own (one
thread), so that short requests never queue behind them.
"""

import asyncio
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from conveyor.frontend.protocol import (APIError, ChatCompletionRequest, ChatMessage, CompletionRequest,
                                        TokenizeRequest, salted)
from conveyor.sampling_params import SamplingParams, resolve_max_tokens

SLOW_PROMPT_CHARS = 8192  # longer prompts are prepared on the slow lane: tokenizing them takes milliseconds
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


class PromptPreparer:
    """Turns a request's prompt, or its messages, into the engine's prompts, for `engine` (an
    AsyncLLM: its tokenizer and max_model_len), given with each call."""

    def __init__(self, trust_request_chat_template: bool = False):
        self.trust_request_chat_template = trust_request_chat_template
        self._chars_per_token = 0
        self.slow_lane = ThreadPoolExecutor(max_workers=1, thread_name_prefix="conveyor-slow-prompts")

    async def _off_loop(self, fn: Callable[[], Any], slow: bool) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.slow_lane if slow else None, fn)

    def check_chars(self, engine, length: int, param: str) -> None:
        """A text of more characters than fit in max_model_len tokens is a 400, before tokenizing."""
        if not self._chars_per_token:
            self._chars_per_token = max(map(len, engine.tokenizer.get_vocab())) * CHARS_PER_TOKEN_SLACK
        if length > (limit := engine.max_model_len * self._chars_per_token):
            raise APIError(400, f"{param} is {length} characters long: more than fit in max_model_len "
                                f"({engine.max_model_len}) tokens ({limit} characters at most)", param)

    async def completion_prompts(self, engine, body: CompletionRequest, params: SamplingParams) -> list:
        """The engine prompts of a completion request; a long text is tokenized here, on the slow
        lane, and checked against max_model_len there."""
        prompts = body.prompts()
        for prompt in prompts:
            text = prompt.get("prompt")
            if text is None:
                continue
            self.check_chars(engine, len(text), "prompt")
            if len(text) > SLOW_PROMPT_CHARS:
                prompt["prompt_token_ids"] = await self._off_loop(
                    lambda t=text: _tokenized(engine, t, params), slow=True)
        return prompts

    async def tokenize(self, engine, body: TokenizeRequest) -> list[int]:
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages")
        if body.messages is not None:
            return (await self.render_chat(engine, body.messages, body.add_generation_prompt))[1]
        self.check_chars(engine, len(body.prompt), "prompt")
        encode = engine.tokenizer.encode
        return await self._off_loop(lambda: encode(body.prompt, add_special_tokens=body.add_special_tokens),
                                    slow=len(body.prompt) > SLOW_PROMPT_CHARS)

    async def chat_prompt(self, engine, body: ChatCompletionRequest) -> dict:
        """The engine prompt of a chat request: its rendered text and token ids."""
        kwargs = dict(body.chat_template_kwargs or {})
        if body.tools:
            kwargs["tools"] = [tool.model_dump(exclude_none=True) for tool in body.tools]
        text, ids = await self.render_chat(engine, body.messages, body.add_generation_prompt and not
                                           body.continue_final_message, body.continue_final_message,
                                           kwargs, self.request_template(body))
        return salted({"prompt": text, "prompt_token_ids": ids}, body.cache_salt)

    def request_template(self, body: ChatCompletionRequest) -> str | None:
        """The chat template the request brings, if the server trusts requests with one."""
        in_kwargs = (body.chat_template_kwargs or {}).get("chat_template")
        for param, template in (("chat_template", body.chat_template),
                                ("chat_template_kwargs.chat_template", in_kwargs)):
            if template is not None and not self.trust_request_chat_template:
                raise APIError(400, "this server renders only its own chat template: a template from the "
                                    "request needs a server started with --trust-request-chat-template", param)
        return body.chat_template if body.chat_template is not None else in_kwargs

    async def render_chat(self, engine, messages: list[ChatMessage], add_generation_prompt: bool = True,
                          continue_final_message: bool = False, kwargs: dict[str, Any] | None = None,
                          template: str | None = None) -> tuple[str, list[int]]:
        """The chat's text and its token ids. A `template` from the request renders within
        REQUEST_TEMPLATE_SECONDS (and stops when the client leaves); the text must fit in
        max_model_len by its characters before it is tokenized."""
        tokenizer = engine.tokenizer
        if template is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template: use /v1/completions")
        conversation = [m.for_template() for m in messages]
        chars = sum(len(m.get("content", "")) for m in conversation)
        self.check_chars(engine, chars, "messages")
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
            self.check_chars(engine, len(text), "messages")
            return text, tokenizer.encode(text, add_special_tokens=False)

        try:
            return await self._off_loop(prepare, slow=budget is not None or chars > SLOW_PROMPT_CHARS)
        except asyncio.CancelledError:
            if budget is not None:
                budget.cancel()  # the client left: stop rendering too
            raise
        except TemplateStopped as e:
            raise APIError(400, str(e), "chat_template") from None


def _tokenized(engine, text: str, params: SamplingParams) -> list[int]:
    ids = engine.tokenizer.encode(text)
    resolve_max_tokens(len(ids), params.max_tokens, engine.max_model_len)
    return ids
