"""Random sampling through the real processes: every tensor-parallel rank draws the same numbers,
unseeded output follows from the engine's `seed`, and a seeded request's tokens do not depend on
its batch, preemptions or async scheduling."""

import asyncio

import pytest
from transformers import AutoConfig

from conveyor import AsyncLLM, SamplingParams
from reference import hf_sequence_logprobs, make_prompts

LENS = [5, 17, 33, 40, 48, 64, 80, 96]
MAX_TOKENS = 24


def sampled(seed: int | None = None, **kw) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=MAX_TOKENS, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def prompts(llama_dir) -> list[list[int]]:
    return make_prompts(AutoConfig.from_pretrained(llama_dir).vocab_size, LENS, seed=2)


async def run_one(llm: AsyncLLM, prompt: list[int], params: SamplingParams):
    async for out in llm.generate({"prompt_token_ids": prompt}, params):
        pass
    return out.outputs[0]


async def run_all(llm: AsyncLLM, prompts, params) -> list[list[int]]:
    outs = await asyncio.gather(*(run_one(llm, p, q) for p, q in zip(prompts, params)))
    return [out.token_ids for out in outs]


async def test_tensor_parallel_unseeded_logprobs_match_transformers_on_the_returned_tokens(llama_dir, prompts):
    async with AsyncLLM(llama_dir, dtype="float32", num_kv_blocks=256, tensor_parallel_size=2) as llm:
        outs = await asyncio.gather(*(run_one(llm, p, sampled(logprobs=0)) for p in prompts))
    tokens = [out.token_ids for out in outs]
    reported = [[position[t].logprob for t, position in zip(out.token_ids, out.logprobs)] for out in outs]
    for got, want in zip(reported, hf_sequence_logprobs(llama_dir, prompts, tokens)):
        assert got == pytest.approx(want, abs=1e-4)


async def test_engine_seed_reproduces_unseeded_output_and_requests_draw_apart(llama_dir, prompts):
    twice = prompts[:4] + prompts[:4]  # the same prompts again: other requests, other draws
    runs = []
    for seed in (5, 5, 6):
        async with AsyncLLM(llama_dir, dtype="float32", num_kv_blocks=256, seed=seed) as llm:
            runs.append(await run_all(llm, twice, [sampled()] * len(twice)))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert all(first != again for first, again in zip(runs[0][:4], runs[0][4:]))


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
async def test_seeded_tokens_do_not_depend_on_batch_or_preemption(llama_dir, prompts, async_scheduling):
    params = [sampled(seed=100 + i) for i in range(len(prompts))]
    # 16 blocks of 16 tokens hold any one request, far from all of them at once
    async with AsyncLLM(llama_dir, dtype="float32", num_kv_blocks=16, async_scheduling=async_scheduling) as llm:
        alone = [(await run_one(llm, p, q)).token_ids for p, q in zip(prompts, params)]
        assert (await llm.get_stats())["num_preemptions"] == 0
        together = await run_all(llm, prompts, params)
        assert (await llm.get_stats())["num_preemptions"] > 0, "the cache was meant to force preemptions"
    assert together == alone
