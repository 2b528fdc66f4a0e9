"""LLM: the offline, synchronous batch API over the same engine as AsyncLLM.

    with LLM("path/to/model") as llm:
        outputs = llm.generate(["Hello", "The capital of France is"], SamplingParams(max_tokens=32))

Requests run on a private event loop in a background thread, so this works from plain scripts
and from notebooks whose own loop is already running in the caller's thread.
"""

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import msgspec
from tqdm.auto import tqdm

from conveyor.frontend.async_llm import AsyncLLM, PromptType
from conveyor.frontend.outputs import RequestOutput
from conveyor.lora import LoRARequest
from conveyor.sampling_params import RequestOutputKind, SamplingParams

Conversation = list[dict[str, Any]]


class LLM:
    def __init__(self, model: str | None = None, tokenizer: str | None = None, **engine_args: Any):
        self.engine = AsyncLLM(model, tokenizer, **engine_args)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="conveyor-llm-loop")
        self.thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; results come back in input order. `lora_request`: one
        adapter for every prompt, or one (or None: the base model) per prompt."""
        prompts = normalize_prompts(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [final_only(sampling_params or SamplingParams())] * len(prompts)
        else:
            params = [final_only(p) for p in sampling_params]
            if len(params) != len(prompts):
                raise ValueError(f"sampling_params must be one SamplingParams or one per prompt "
                                 f"({len(prompts)}), got {len(params)}")
        if lora_request is None or isinstance(lora_request, LoRARequest):
            loras = [lora_request] * len(prompts)
        else:
            loras = list(lora_request)
            if len(loras) != len(prompts):
                raise ValueError(f"lora_request must be one LoRARequest or one per prompt ({len(prompts)}), "
                                 f"got {len(loras)}")
        future = asyncio.run_coroutine_threadsafe(self._run(prompts, params, loras, use_tqdm), self.loop)
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()
            raise

    def chat(
        self,
        messages: Conversation | list[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them (with the `tools`
        the model may call, OpenAI's format), then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            self.tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=add_generation_prompt, tools=tools,
                **(chat_template_kwargs or {}),
            )
            for conversation in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    async def _run(self, prompts, params, loras, use_tqdm: bool) -> list[RequestOutput]:
        bar = tqdm(total=len(prompts), desc="Generating", unit="req", disable=not use_tqdm)
        generated = 0

        async def one(prompt, p, lora):
            nonlocal generated
            async for output in self.engine.generate(prompt, p, lora_request=lora):
                pass
            generated += sum(len(c.token_ids) for c in output.outputs)
            bar.update(1)
            bar.set_postfix_str(f"{generated / max(bar.format_dict['elapsed'], 1e-9):.1f} tok/s", refresh=False)
            return output

        try:
            tasks = [asyncio.ensure_future(one(prompt, p, lora)) for prompt, p, lora in zip(prompts, params, loras)]
            try:
                return list(await asyncio.gather(*tasks))
            except BaseException:
                for task in tasks:
                    task.cancel()
                raise
        finally:
            bar.close()

    def shutdown(self) -> None:
        self.engine.shutdown()
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def final_only(params: SamplingParams) -> SamplingParams:
    """Offline callers get each request's last output only, so the engine need not build one a
    step: a cumulative output copies every token so far, which makes a long request's outputs
    cost O(length²)."""
    if params.output_kind == RequestOutputKind.FINAL_ONLY:
        return params
    return msgspec.structs.replace(params, output_kind=RequestOutputKind.FINAL_ONLY)


def normalize_prompts(prompts) -> list[PromptType]:
    """A str, token ids, or a dict is one prompt; a list of those is many."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]
    return list(prompts)
