"""Beam search over the engine, the way transformers' `generate(num_beams=...)` does it.

Each step asks the engine, for every live beam, for the top-K log-probabilities of its next
token (one single-token request per beam; the prefix cache makes the shared history nearly
free). The candidates are then ranked exactly as transformers ranks them: the top K = 2·width
continuations by accumulated log-probability, the best `width` unfinished ones continue, and
those among the top `width` that hit EOS or the length limit become finished hypotheses scored
`sum_logprobs / generated_length ** length_penalty`.
"""

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from conveyor.frontend.outputs import CompletionOutput, RequestMetrics, RequestOutput
from conveyor.sampling_params import RequestOutputKind, SamplingParams, resolve_max_tokens

NEG_INF = -1.0e9


@dataclass(slots=True)
class Beam:
    tokens: list[int]
    score: float  # sum of log-probabilities (normalised by length once finished)
    finished: bool = False


async def beam_search_stream(llm, prompt, params: SamplingParams, request_id: str, priority: int = 0,
                             lora: tuple[int, str | None] = (0, None)) -> AsyncIterator[RequestOutput]:
    """`llm.generate` for `use_beam_search`: one output, the finished beams."""
    params.check_limits(llm.config.request_limits)
    yield await beam_search(llm, prompt, params, request_id, priority, lora)


async def beam_search(llm, prompt, params: SamplingParams, request_id: str, priority: int = 0,
                      lora: tuple[int, str | None] = (0, None)) -> RequestOutput:
    width = params.n
    text, prompt_ids = llm.tokenize(prompt)
    salt = {key: prompt[key] for key in ("cache_salt", "prompt_embedding_table")  # what every beam's prompt keeps
            if isinstance(prompt, dict) and key in prompt}
    max_tokens = resolve_max_tokens(len(prompt_ids), params.max_tokens, llm.max_model_len)
    stop_ids = set() if params.ignore_eos else set(llm.eos_token_ids) | set(params.stop_token_ids)
    num_candidates = max(2, 1 + len(stop_ids)) * width
    metrics = RequestMetrics(arrival_time=time.time())
    per_beam = min(num_candidates, llm.hf_config.vocab_size)  # all of them could come from one beam
    step_params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, logprobs=per_beam,
                                 detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY)

    running = [Beam([], 0.0)]  # transformers starts with width copies, all but one at -1e9
    finished: list[Beam] = []
    improvable = True
    for step in range(max_tokens):
        tops = await asyncio.gather(*(
            _next_logprobs(llm, {"prompt_token_ids": prompt_ids + beam.tokens, **salt}, step_params,
                           f"{request_id}-beam{step}.{b}", priority, lora)
            for b, beam in enumerate(running)
        ))
        candidates = sorted(
            ((beam.score + logprob, b, token) for b, (beam, top) in enumerate(zip(running, tops))
             for token, logprob in top),
            key=lambda c: (-c[0], c[1], c[2]),
        )[:num_candidates]
        hits = [token in stop_ids or step + 1 >= max_tokens for _, _, token in candidates]

        all_full = len(finished) == width and params.early_stopping
        if improvable and not all_full:
            normaliser = (step + 1) ** params.length_penalty
            for rank, ((score, b, token), hit) in enumerate(zip(candidates, hits)):
                if hit and rank < width:
                    finished.append(Beam(running[b].tokens + [token], score / normaliser, True))
            finished = sorted(finished, key=lambda beam: -beam.score)[:width]

        running = [Beam(running[b].tokens + [token], score)
                   for (score, b, token), hit in zip(candidates, hits) if not hit][:width]
        improvable = improvable and _can_improve(running, finished, width, step + 1, params)
        if not running or not improvable or (len(finished) == width and params.early_stopping):
            break

    outputs = [
        CompletionOutput(i, llm.tokenizer.decode(beam.tokens, skip_special_tokens=params.skip_special_tokens),
                         beam.tokens, cumulative_logprob=beam.score,
                         finish_reason="stop" if beam.tokens[-1] in stop_ids else "length")
        for i, beam in enumerate(finished)
    ]
    return RequestOutput(request_id, text, prompt_ids, outputs, finished=True, metrics=metrics)


def _can_improve(running: list[Beam], finished: list[Beam], width: int, generated: int,
                 params: SamplingParams) -> bool:
    """transformers' early-stop heuristic: could the best running beam still beat the worst kept
    hypothesis? Always yes while fewer than `width` hypotheses are kept."""
    if len(finished) < width or not running:
        return True
    best_possible = running[0].score / (generated ** params.length_penalty)
    return best_possible > min(beam.score for beam in finished)


async def _next_logprobs(llm, prompt: dict, params, request_id, priority, lora) -> list[tuple[int, float]]:
    # the engine's own request: it may ask for more logprobs than a caller may (request_limits)
    async for output in llm._generate_one(prompt, params, request_id, priority, None, lora):
        pass
    position = output.outputs[0].logprobs[0]
    return [(token, entry.logprob) for token, entry in position.items()]
