"""AsyncLLM through the real processes: exact tokens under batching, preemption, chunked prefill,
prefix caching and tensor parallelism; cancellation frees blocks."""

import asyncio

import pytest
from transformers import AutoConfig

from conveyor import AsyncLLM, SamplingParams
from conveyor.engine_core.executor import OMP_SPIN_COUNT, worker_env
from idle import wait_idle
from procs import engine_pids
from reference import hf_greedy, make_prompts

LENS = [1, 3, 7, 12, 17, 25, 33, 40, 48, 63, 64, 65, 80, 96, 100, 128] * 2
OUTS = [4, 9, 16, 23, 30, 12, 5, 27] * 4


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


async def run_one(llm: AsyncLLM, prompt: list[int], max_tokens: int):
    async for out in llm.generate({"prompt_token_ids": prompt}, greedy(max_tokens)):
        pass
    return out


async def run_all(llm: AsyncLLM, prompts, outs):
    results = await asyncio.gather(*(run_one(llm, p, n) for p, n in zip(prompts, outs)))
    return [r.outputs[0].token_ids for r in results]


@pytest.fixture(scope="module")
def workload(llama_dir):
    prompts = make_prompts(AutoConfig.from_pretrained(llama_dir).vocab_size, LENS, seed=1)
    expected = [tokens[:n] for (tokens, _), n in zip(hf_greedy(llama_dir, prompts, max(OUTS)), OUTS)]
    return prompts, expected


@pytest.fixture(scope="module")
def engine(llama_dir):
    llm = AsyncLLM(llama_dir, dtype="float32", num_kv_blocks=512)
    yield llm
    llm.shutdown()


async def test_concurrent_requests_match_transformers_and_running_alone(engine, workload):
    prompts, expected = workload
    together = await run_all(engine, prompts, OUTS)
    assert together == expected
    alone = [(await run_one(engine, p, n)).outputs[0].token_ids for p, n in zip(prompts[:6], OUTS[:6])]
    assert alone == expected[:6]


async def test_repeated_prompt_hits_prefix_cache(engine, workload):
    prompts, expected = workload
    prompt = prompts[-1]  # 128 tokens: 8 full blocks of 16
    first = await run_one(engine, prompt, OUTS[-1])
    again = await run_one(engine, prompt, OUTS[-1])
    assert again.outputs[0].token_ids == first.outputs[0].token_ids == expected[-1]
    assert again.num_cached_tokens == 112  # every full block but the one holding the last prompt token


async def cached_tokens_of(engine: AsyncLLM, prompt: list[int], cache_salt: str) -> int:
    async for out in engine.generate({"prompt_token_ids": prompt, "cache_salt": cache_salt}, greedy(1)):
        pass
    return out.num_cached_tokens


async def test_prompts_with_different_cache_salts_share_no_cached_blocks(engine):
    (prompt,) = make_prompts(engine.hf_config.vocab_size, (48,), seed=11)
    assert await cached_tokens_of(engine, prompt, "tenant-a") == 0
    assert await cached_tokens_of(engine, prompt, "tenant-b") == 0


async def test_prompts_with_the_same_cache_salt_share_cached_blocks(engine):
    (prompt,) = make_prompts(engine.hf_config.vocab_size, (48,), seed=12)
    assert await cached_tokens_of(engine, prompt, "tenant-a") == 0
    assert await cached_tokens_of(engine, prompt, "tenant-a") == 32  # all full blocks but the last token's


@pytest.mark.parametrize("salt", ["", 7])
async def test_cache_salt_must_be_a_non_empty_string(engine, salt):
    with pytest.raises(ValueError, match="cache_salt must be a non-empty string if given, got"):
        async for _ in engine.generate({"prompt": "Hello", "cache_salt": salt}, greedy(1)):
            pass


LONG = 1800  # tokens: ~1800 one-token steps alone, about a second on this machine


async def start_running(engine: AsyncLLM) -> tuple[asyncio.Task, int]:
    """A task streaming a LONG-token request that the engine reports running, and the engine's
    step count from before the request. On a starved machine the request can end before the
    stats call reaches the core; then it starts another."""
    for _ in range(5):
        steps_before = (await wait_idle(engine))["num_steps"]
        started = asyncio.Event()

        async def consume():
            async for _ in engine.generate({"prompt_token_ids": list(range(3, 200))}, greedy(LONG)):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        stats = await engine.get_stats()
        if stats["num_running"] == 1 and stats["kv_cache_usage"] > 0:
            return task, steps_before
        await task
    pytest.fail(f"a {LONG}-token request ended five times before the engine reported it running")


async def test_cancelled_stream_frees_its_blocks(engine):
    task, steps_before = await start_running(engine)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stats = await wait_idle(engine)
    assert stats["kv_cache_usage"] == 0 and stats["num_running"] == 0
    assert stats["num_steps"] - steps_before < LONG  # stopped by the abort, not run to its end


async def test_breaking_out_of_the_stream_aborts_the_request(engine):
    steps_before = (await wait_idle(engine))["num_steps"]
    async for out in engine.generate({"prompt_token_ids": list(range(3, 50))}, greedy(LONG)):
        if len(out.outputs[0].token_ids) >= 3:
            break
    stats = await wait_idle(engine)
    assert stats["num_running"] == 0 and stats["kv_cache_usage"] == 0
    assert stats["num_steps"] - steps_before < LONG


def test_workers_spin_briefly_unless_openmp_was_configured(engine, monkeypatch):
    _, workers = engine_pids(engine)
    with open(f"/proc/{workers[0]}/environ", "rb") as f:
        assert f"GOMP_SPINCOUNT={OMP_SPIN_COUNT}".encode() in f.read().split(b"\0")
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    assert worker_env() == {}
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("GOMP_SPINCOUNT", "5")
    assert worker_env() == {}


async def test_prompt_beyond_max_model_len_fails_alone(engine, workload):
    prompts, expected = workload
    good = asyncio.create_task(run_one(engine, prompts[5], OUTS[5]))
    with pytest.raises(ValueError, match="max_model_len"):
        async for _ in engine.generate({"prompt_token_ids": [5] * 3000}, greedy(4)):
            pass
    assert (await good).outputs[0].token_ids == expected[5]


async def test_request_larger_than_the_whole_cache_is_rejected(llama_dir):
    llm = AsyncLLM(llama_dir, dtype="float32", num_kv_blocks=4, block_size=16)
    try:
        async for out in llm.generate({"prompt_token_ids": list(range(3, 60))}, greedy(30)):
            pass
        assert out.finished and out.outputs[0].finish_reason == "error"
        assert "KV cache" in out.error_message
    finally:
        llm.shutdown()


@pytest.mark.parametrize(
    "engine_args",
    [
        pytest.param({"num_kv_blocks": 24}, id="preemption"),
        pytest.param({"max_num_batched_tokens": 16}, id="chunked-prefill"),
        pytest.param({"tensor_parallel_size": 2}, id="tensor-parallel-2"),
        pytest.param({"block_size": 1, "max_num_seqs": 5}, id="block-size-1"),
        pytest.param({"async_scheduling": True}, id="async-scheduling"),
        pytest.param({"async_scheduling": True, "num_kv_blocks": 24}, id="async-scheduling-preemption"),
        pytest.param({"async_scheduling": True, "max_num_batched_tokens": 16}, id="async-scheduling-chunked"),
    ],
)
async def test_outputs_stay_exact_under(engine_args, llama_dir, workload):
    prompts, expected = workload
    llm = AsyncLLM(llama_dir, dtype="float32", **engine_args)
    try:
        assert await run_all(llm, prompts, OUTS) == expected
        if "num_kv_blocks" in engine_args:
            stats = await llm.get_stats()
            assert stats["num_preemptions"] > 0, "the cache was meant to be too small to avoid preemption"
    finally:
        llm.shutdown()


async def test_async_scheduling_stops_at_the_stop_token_and_frees_everything(llama_dir, workload):
    """The step after a stop is already scheduled when the stop is seen: its token must not show."""
    prompts, expected = workload
    llm = AsyncLLM(llama_dir, dtype="float32", num_kv_blocks=256, async_scheduling=True)
    try:
        cases = [(p, e) for p, e in zip(prompts, expected) if len(e) >= 8][:6]
        assert cases, "the workload has no generation long enough to stop inside"

        async def run(prompt, tokens):
            stop = tokens[4]
            params = SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[stop], ignore_eos=True)
            async for out in llm.generate({"prompt_token_ids": prompt}, params):
                pass
            return out.outputs[0], tokens[: tokens.index(stop) + 1]
        for got, want in await asyncio.gather(*(run(p, e) for p, e in cases)):
            assert got.token_ids == want and got.finish_reason == "stop"
        stats = await llm.get_stats()
        assert stats["num_running"] == 0 and stats["kv_cache_usage"] == 0
    finally:
        llm.shutdown()


async def test_priority_policy_runs_urgent_requests_first(llama_dir):
    llm = AsyncLLM(llama_dir, dtype="float32", num_kv_blocks=256, max_num_seqs=1, scheduling_policy="priority")
    finished_order = []

    running = asyncio.Event()

    async def run(name, priority, max_tokens):
        async for _ in llm.generate({"prompt_token_ids": [5, 6, 7]}, greedy(max_tokens), request_id=name,
                                    priority=priority):
            running.set()
        finished_order.append(name)

    try:
        first = asyncio.create_task(run("running", 5, 2000))  # holds the seat for a good while
        await running.wait()  # it holds the only seat; the next two queue behind it
        later = [asyncio.create_task(run("low", 9, 4)), asyncio.create_task(run("high", 0, 4))]
        await asyncio.gather(first, *later)
        assert finished_order == ["running", "high", "low"]
    finally:
        llm.shutdown()
