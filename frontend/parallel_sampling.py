"""`n > 1` samples of one prompt: one engine request per sample, merged into one stream.

The prompt is tokenized once and the prefix cache computes it once; sample i runs with seed
`seed + i` (wrapped within int64). The merged RequestOutput holds a CompletionOutput per sample,
indexed by sample; leaving the stream early aborts every sample.
"""

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import msgspec

from conveyor.frontend.output_processor import RequestState
from conveyor.frontend.outputs import RequestOutput
from conveyor.sampling_params import RequestOutputKind, SamplingParams, child_seed

YIELD_EVERY = 16  # requests added in a row before yielding to the event loop (n > 1, many prompts)


async def generate_n(llm, prompt, params: SamplingParams, request_id: str, priority: int,
                     lora: tuple[int, str | None]) -> AsyncIterator[RequestOutput]:
    """`llm.generate` for `params.n` > 1: every update of any sample, as `params.output_kind` asks
    (DELTA: the samples that changed; CUMULATIVE: every sample so far; FINAL_ONLY: one output)."""
    params.check_limits(llm.config.request_limits)
    n, kind = params.n, params.output_kind
    states: list[RequestState] = []
    waiting: dict[asyncio.Future, int] = {}
    try:
        for i in range(n):
            child = msgspec.structs.replace(params, n=1, seed=child_seed(params.seed, i))
            state = await llm.add_request(prompt, child, f"{i}_{request_id}", priority, lora)
            states.append(state)
            prompt = {"prompt": state.prompt, "prompt_token_ids": state.prompt_token_ids,  # tokenized once
                      **{key: prompt[key] for key in ("cache_salt", "prompt_embedding_table")
                         if isinstance(prompt, dict) and key in prompt}}
            if i % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)  # the loop serves others (and notices a caller that left)
        latest: list[RequestOutput | None] = [None] * n
        waiting.update({asyncio.ensure_future(state.mailbox.get()): i for i, state in enumerate(states)})
        while waiting:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            changed = []
            for future in done:
                i = waiting.pop(future)
                latest[i] = future.result()
                changed.append(i)
                if not latest[i].finished:
                    waiting[asyncio.ensure_future(states[i].mailbox.get())] = i
            if kind == RequestOutputKind.FINAL_ONLY and waiting:
                continue
            shown = sorted(changed) if kind == RequestOutputKind.DELTA else [i for i in range(n) if latest[i]]
            yield merged(request_id, [(i, latest[i]) for i in shown], finished=not waiting)
    finally:
        for future in waiting:
            future.cancel()
        await llm.abort([state.request_id for state in states])


def merged(request_id: str, samples: list[tuple[int, RequestOutput]], finished: bool) -> RequestOutput:
    """One RequestOutput of the samples' latest outputs, each sample's completion at its index."""
    first = samples[0][1]
    outputs = [out for _, out in samples]
    return RequestOutput(
        request_id=request_id,
        prompt=first.prompt,
        prompt_token_ids=first.prompt_token_ids,
        outputs=[dataclasses.replace(out.outputs[0], index=i) for i, out in samples],
        finished=finished,
        prompt_logprobs=first.prompt_logprobs,
        num_cached_tokens=min(out.num_cached_tokens for out in outputs),
        metrics=first.metrics,
        error_code=next((out.error_code for out in outputs if out.error_code), None),
        error_message=next((out.error_message for out in outputs if out.error_message), None),
    )
