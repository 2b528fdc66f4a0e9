"""AsyncLLM: the engine inside the caller's asyncio application.

    llm = AsyncLLM("path/to/model")
    async for out in llm.generate("Hello", SamplingParams(max_tokens=32)):
        print(out.outputs[0].text)

Every `generate()` works in whatever event loop calls it: outputs reach each request through its
own loop, so nothing is bound to the first loop used (several `asyncio.run`s in a row work).
Leaving the iterator early (break, cancel, close) aborts the request in the engine.
"""

import asyncio
import atexit
import logging
import os
import shutil
import tempfile
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec

from conveyor.config import EngineConfig, RequestLimits, default_model, resolve_max_model_len
from conveyor.frontend.beam_search import beam_search_stream
from conveyor.frontend.core_client import CoreClient
from conveyor.frontend.detokenizer import IncrementalDetokenizer
from conveyor.frontend.output_processor import OutputMailbox, OutputProcessor, RequestState, deliver_threadsafe
from conveyor.frontend.outputs import RequestMetrics, RequestOutput
from conveyor.frontend.parallel_sampling import generate_n
from conveyor.frontend.structured_outputs import GrammarCompiler
from conveyor.sampling_params import (INT64_MAX, INT64_MIN, SamplingParams, resolve_logits_processor,
                                      resolve_max_tokens)
from conveyor.ipc.messages import EMBEDDING_DTYPES, EmbeddingTable, EngineCoreOutputs, EngineCoreRequest
from conveyor.ipc.process import freeze_startup_objects
from conveyor.lora import WEIGHTS_FILE, LoRARequest, check_adapter, save_adapter

logger = logging.getLogger(__name__)

TOKENIZE_OFF_LOOP_CHARS = 256  # longer prompts are tokenized on a thread, off the event loop

PromptType = str | dict[str, Any] | list[int]
NO_LORA = (0, None)  # (adapter id, its path): the base model


def eos_token_ids(model: str, tokenizer) -> list[int]:
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(model).eos_token_id
    except OSError:
        eos = None
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def check_priority(priority: int) -> None:
    """A priority the engine's messages can carry (msgpack: int64)."""
    if not (isinstance(priority, int) and not isinstance(priority, bool) and INT64_MIN <= priority <= INT64_MAX):
        raise ValueError(f"priority must be an int in [{INT64_MIN}, {INT64_MAX}], got {priority!r}")


def _release(client: CoreClient, executor: ThreadPoolExecutor, grammars: GrammarCompiler,
             lora_dir: str | None) -> None:
    client.shutdown()
    executor.shutdown(wait=False, cancel_futures=True)
    grammars.shutdown()
    if lora_dir is not None:
        shutil.rmtree(lora_dir, ignore_errors=True)


def cache_salt_of(prompt: PromptType) -> str | None:
    """A prompt dict's `cache_salt`: requests share cached prefix blocks only with requests of the
    same salt (vLLM's field), so tenants cannot probe each other's prompts through the cache."""
    salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise ValueError(f"cache_salt must be a non-empty string if given, got {salt!r}")
    return salt


def embedding_table_of(prompt: PromptType, hidden_size: int) -> EmbeddingTable | None:
    """A prompt dict's `prompt_embedding_table` (prompt tuning, the seed's form): a [rows, hidden_size]
    float tensor whose row i stands for the virtual token id vocab_size + i of `prompt_token_ids`."""
    table = prompt.get("prompt_embedding_table") if isinstance(prompt, dict) else None
    if table is None:
        return None
    if "prompt_token_ids" not in prompt:
        raise ValueError("prompt_embedding_table needs prompt_token_ids (ids >= the vocabulary size index the "
                         "table), not a text prompt")
    import torch

    if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[0] < 1 or table.shape[1] != hidden_size:
        shape = list(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
        raise ValueError(f"prompt_embedding_table must be a tensor of shape [rows >= 1, {hidden_size}], got {shape}")
    dtype = str(table.dtype).removeprefix("torch.")
    if dtype not in EMBEDDING_DTYPES:
        raise ValueError(f"prompt_embedding_table must be of dtype {', '.join(EMBEDDING_DTYPES)}, got {dtype}")
    table = table.detach().cpu().contiguous()
    if not bool(torch.isfinite(table).all()):
        raise ValueError("prompt_embedding_table must hold finite values")
    return EmbeddingTable(dtype, list(table.shape), table.view(torch.uint8).numpy().tobytes())


class AsyncLLM:
    """`engine_address` (tcp://HOST:PORT or ipc://PATH) connects to an engine core that is already
    running there (`conveyor serve --headless`, or the launcher of `--api-server-count`) instead of
    starting one; the engine arguments are then the core's, and only the tokenizer loads here."""

    def __init__(self, model: str | None = None, tokenizer: str | None = None, engine_address: str | None = None,
                 **engine_args: Any):
        self.config = EngineConfig(model=model or default_model(), tokenizer=tokenizer, **engine_args)
        self.output_processor = OutputProcessor(None)
        # One thread: tokenizing holds the GIL, and every extra contender delays the event loop.
        self.input_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="conveyor-input")
        # Start the engine first: transformers imports and the tokenizer loads here (seconds)
        # while the workers load the model.
        self.client = CoreClient(self.config, self._on_outputs, self.output_processor.fail_all, engine_address)
        # adapters given in memory, written as PEFT directories for the workers to read
        self.lora_dir = tempfile.mkdtemp(prefix="conveyor-lora-") if self.config.enable_lora else None
        self.checked_adapters: dict[str, float] = {}  # path -> modification time when checked
        self.saved_adapters: dict[int, dict] = {}  # id -> the lora_weights last written for it
        self.grammars = GrammarCompiler()  # structured outputs' grammars, compiled on a thread of their own
        self._grammar_tokenizer_sent = None  # the call that sends the workers the tokenizer's grammar view
        self._finalizer = weakref.finalize(self, _release, self.client, self.input_executor, self.grammars,
                                           self.lora_dir)
        atexit.register(self._finalizer)
        try:
            self.hf_config = self.config.load_hf_config()
            if engine_address is None:  # a core of our own: a bad limit fails here, before its workers do
                resolve_max_model_len(self.config, self.hf_config)
            self.tokenizer = self.config.load_tokenizer()
            self.eos_token_ids = eos_token_ids(self.config.model, self.tokenizer)
            self.output_processor.tokenizer = self.tokenizer
            self.grammars.bind(self.tokenizer, self.hf_config.vocab_size)
            self.client.wait_ready()
            self.max_model_len = self.client.max_model_len  # the core's word (the workers resolved it)
        except BaseException:
            self.shutdown()
            raise
        freeze_startup_objects()  # torch, transformers, the tokenizer: collections over them stall the loop

    # ---- the public surface ----

    def generate(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream the request's outputs (`async for`). Nothing is sent to the engine before the
        first iteration; closing the stream early aborts the request. A request beyond the
        engine's `request_limits`, or naming an adapter that does not fit the model, raises
        ValueError. (A plain function returning the stream, not a generator wrapping it: one layer
        less on every output of every request.)"""
        params = sampling_params or SamplingParams()
        request_id = request_id or uuid.uuid4().hex
        lora = self.resolve_lora(lora_request)
        if params.use_beam_search:
            return beam_search_stream(self, prompt, params, request_id, priority, lora)
        if params.n > 1:
            return generate_n(self, prompt, params, request_id, priority, lora)
        return self._generate_one(prompt, params, request_id, priority, self.config.request_limits, lora)

    async def _generate_one(self, prompt, params, request_id, priority, limits: RequestLimits | None,
                            lora: tuple[int, str | None] = NO_LORA) -> AsyncIterator[RequestOutput]:
        """One engine request; `limits` None only for the engine's own requests (beam search's)."""
        if limits is not None:
            params.check_limits(limits)
        state = await self.add_request(prompt, params, request_id, priority, lora)
        try:
            while True:
                output = await state.mailbox.get()
                yield output
                if output.finished:
                    return
        finally:
            # Cancelled, closed early or failed: the engine must stop working on it.
            await self.abort(state.request_id)

    async def add_request(self, prompt: PromptType, params: SamplingParams, request_id: str,
                          priority: int = 0, lora: tuple[int, str | None] = NO_LORA) -> RequestState:
        self._check_alive()
        check_priority(priority)
        cache_salt = cache_salt_of(prompt)
        table = embedding_table_of(prompt, self.hf_config.hidden_size)
        if table is not None and params.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs cannot be asked for a prompt with a prompt_embedding_table")
        to_encode = prompt.get("prompt") if isinstance(prompt, dict) and "prompt_token_ids" not in prompt else prompt
        if isinstance(to_encode, str) and len(to_encode) > TOKENIZE_OFF_LOOP_CHARS:
            loop = asyncio.get_running_loop()
            prepared = await loop.run_in_executor(self.input_executor, self.process_inputs, prompt, params)
        else:
            prepared = self.process_inputs(prompt, params)
        text, token_ids, params, detokenizer = prepared
        if params.structured_outputs is not None:  # waits for its grammar; nothing else does
            params.compiled_grammar = await self.grammars.compile(params.structured_outputs)
            await self._send_grammar_tokenizer()
        arrival = time.time()
        state = RequestState(request_id, text, token_ids, params, detokenizer,
                             OutputMailbox(asyncio.get_running_loop(), params.output_kind), RequestMetrics(arrival))
        self.output_processor.add_request(state)
        try:
            self.client.add_request(EngineCoreRequest(request_id, token_ids, params, arrival, priority=priority,
                                                      lora_id=lora[0], cache_salt=cache_salt, lora_path=lora[1],
                                                      prompt_embedding_table=table))
        except BaseException:
            self.output_processor.remove(request_id)
            raise
        return state

    def resolve_lora(self, lora_request: LoRARequest | None) -> tuple[int, str | None]:
        """(adapter id, PEFT directory) of a request's adapter, checked against the model; the
        directory is None for an id alone, which the engine resolves (or refuses, if evicted)."""
        if lora_request is None:
            return NO_LORA
        if not isinstance(lora_request, LoRARequest):
            raise ValueError(f"lora_request must be a LoRARequest, got {type(lora_request).__name__}")
        if not self.config.enable_lora:
            raise ValueError("lora_request needs an engine started with enable_lora=True")
        path = lora_request.lora_path
        if lora_request.lora_weights is not None:
            path = os.path.join(self.lora_dir, str(lora_request.lora_int_id))
            if self.saved_adapters.get(lora_request.lora_int_id) is not lora_request.lora_weights:
                staged = path + ".new"  # checked before it replaces what the workers may read
                shutil.rmtree(staged, ignore_errors=True)
                save_adapter(staged, lora_request.lora_weights, lora_request.lora_config)
                check_adapter(staged, self.hf_config, self.config.max_lora_rank)
                shutil.rmtree(path, ignore_errors=True)
                os.rename(staged, path)
                self.saved_adapters[lora_request.lora_int_id] = lora_request.lora_weights
        if path is None:
            return lora_request.lora_int_id, None
        path = os.path.abspath(path)
        try:
            mtime = os.path.getmtime(os.path.join(path, WEIGHTS_FILE))
        except OSError:
            mtime = None
        if mtime is None or self.checked_adapters.get(path) != mtime:
            check_adapter(path, self.hf_config, self.config.max_lora_rank)
            self.checked_adapters[path] = mtime
        return lora_request.lora_int_id, path

    def process_inputs(self, prompt: PromptType, params: SamplingParams):
        """Tokenize, validate and bind one request: (text, token ids, params, detokenizer). Runs on
        a thread for long prompts, so the event loop only does bookkeeping."""
        text, token_ids = self.tokenize(prompt)
        resolve_max_tokens(len(token_ids), params.max_tokens, self.max_model_len)
        for path in params.logits_processors or ():
            resolve_logits_processor(path)  # a bad one fails here, not in the engine
        params = self._bind(params)
        vocab = self.hf_config.vocab_size
        real_ids = token_ids if not token_ids or max(token_ids) < vocab else [t for t in token_ids if t < vocab]
        detokenizer = IncrementalDetokenizer(self.tokenizer, real_ids, params) if params.detokenize else None
        return text, token_ids, params, detokenizer

    async def _send_grammar_tokenizer(self) -> None:
        """Once: the workers get the tokenizer's grammar view (through the core, with its next step)
        before this frontend's first constrained request."""
        if self._grammar_tokenizer_sent is None:
            self._grammar_tokenizer_sent = self.client.call("set_grammar_tokenizer", self.grammars.tokenizer_json)
        sent = self._grammar_tokenizer_sent
        if not sent.done():
            await asyncio.wrap_future(sent)
        sent.result()

    async def abort(self, request_id: str | Iterable[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else request_id
        unfinished = [i for i in ids if self.output_processor.remove(i) is not None]
        if unfinished:
            self.client.abort(unfinished)

    async def get_stats(self) -> dict:
        return await asyncio.wrap_future(self.client.call("stats"))

    async def reset_prefix_cache(self) -> bool:
        return await asyncio.wrap_future(self.client.call("reset_prefix_cache"))

    @property
    def is_dead(self) -> bool:
        return self.client.failure is not None

    def shutdown(self) -> None:
        self._finalizer()

    async def __aenter__(self) -> "AsyncLLM":
        return self

    async def __aexit__(self, *exc) -> None:
        self.shutdown()

    # ---- input processing ----

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                table = prompt.get("prompt_embedding_table")  # its rows stand for the ids past the vocabulary
                rows = len(table) if table is not None and hasattr(table, "__len__") else 0
                return prompt.get("prompt"), self._check_token_ids(prompt["prompt_token_ids"], rows)
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("prompt dict must hold 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, list):
            return None, self._check_token_ids(prompt)
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str, a list of token ids or a dict, got {type(prompt).__name__}")
        return prompt, self.tokenizer.encode(prompt)

    def _check_token_ids(self, token_ids, virtual_rows: int = 0) -> list[int]:
        limit = self.hf_config.vocab_size + virtual_rows
        if not isinstance(token_ids, list) or not all(isinstance(t, int) and 0 <= t < limit for t in token_ids):
            raise ValueError(f"prompt_token_ids must be a list of ints in [0, {limit})"
                             + (f" (the vocabulary, then the prompt_embedding_table's {virtual_rows} rows)"
                                if virtual_rows else ""))
        return token_ids

    def _bind(self, params: SamplingParams) -> SamplingParams:
        """A private copy of the caller's params with the tokenizer's facts filled in."""
        private = msgspec.msgpack.decode(msgspec.msgpack.encode(params), type=SamplingParams)
        private.compiled_grammar = None  # only ever the frontend's own compilation of structured_outputs
        return private.bind_tokenizer(
            self.tokenizer, self.eos_token_ids or None, vocab_size=self.hf_config.vocab_size)

    # ---- outputs (called on the client's output thread) ----

    def _on_outputs(self, message: EngineCoreOutputs) -> None:
        model_time = message.stats.model_time if message.stats else 0.0
        deliveries, to_abort = self.output_processor.process(message.outputs, model_time)
        if to_abort:
            self.client.abort(to_abort)
        deliver_threadsafe(deliveries)

    def _check_alive(self) -> None:
        if self.client.failure is not None:
            raise self.client.failure
