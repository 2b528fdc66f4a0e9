"""Random sampling through the real processes: a seeded request's tokens do not depend on its
batch, preemptions or async scheduling."""

import asyncio

import pytest
from transformers import AutoConfig

from conveyor import AsyncLLM, SamplingParams
from reference import make_prompts

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
