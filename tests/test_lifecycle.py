"""Nothing hangs and nothing outlives its parent: deaths become EngineDeadError within a second,
start-up failures raise from the constructor, and shutdown leaves no process behind."""

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from conveyor import AsyncLLM, EngineDeadError, EngineStartupError, SamplingParams
from conveyor.frontend.async_llm import TOKENIZE_OFF_LOOP_CHARS
from procs import children_of, descendants_of, engine_pids, group_alive, wait_until

LONG = SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)  # outlives every wait below


async def stream_all(llm, prompt, params=LONG, started: asyncio.Event | None = None):
    async for out in llm.generate({"prompt_token_ids": prompt}, params):
        if started is not None:
            started.set()
    return out


async def assert_pending_calls_die_fast(llm, kill):
    started = [asyncio.Event() for _ in range(4)]
    tasks = [asyncio.create_task(stream_all(llm, list(range(3, 20 + i)), started=started[i])) for i in range(4)]
    await asyncio.gather(*(event.wait() for event in started))  # all four are streaming
    assert not any(t.done() for t in tasks)
    kill()
    killed_at = time.monotonic()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=10)
    elapsed = time.monotonic() - killed_at
    assert all(isinstance(r, EngineDeadError) for r in results), results
    assert elapsed < 1.0, f"pending calls took {elapsed:.2f} s to fail"
    with pytest.raises(EngineDeadError):
        await stream_all(llm, [5, 6, 7])
    return results


async def test_killed_worker_fails_every_pending_and_later_call(llama_dir):
    llm = AsyncLLM(llama_dir, dtype="float32", num_kv_blocks=256)
    core, workers = engine_pids(llm)
    try:
        results = await assert_pending_calls_die_fast(llm, lambda: os.kill(workers[0], signal.SIGKILL))
        assert "worker rank 0" in str(results[0]) and "SIGKILL" in str(results[0])
    finally:
        llm.shutdown()
    assert wait_until(lambda: not group_alive(core), timeout=5)
    assert not os.path.exists(llm.client.ipc_dir)


async def test_killed_core_fails_every_pending_and_later_call(llama_dir):
    llm = AsyncLLM(llama_dir, dtype="float32", num_kv_blocks=256)
    core, workers = engine_pids(llm)
    try:
        results = await assert_pending_calls_die_fast(llm, lambda: os.kill(core, signal.SIGKILL))
        assert "engine core" in str(results[0]) and "SIGKILL" in str(results[0])
    finally:
        llm.shutdown()
    assert wait_until(lambda: not any(os.path.exists(f"/proc/{w}") for w in workers), timeout=5)
    assert not os.path.exists(llm.client.ipc_dir)


async def test_exception_inside_forward_reaches_callers_with_its_cause(llama_dir, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    llm = AsyncLLM(llama_dir, dtype="float32", num_kv_blocks=256)
    core, workers = engine_pids(llm)
    try:
        # This logits processor makes the worker's next step raise, outside any processor.
        params = SamplingParams(max_tokens=5, logits_processors=["user_logits_processors:break_the_worker"])
        with pytest.raises(EngineDeadError, match="conveyor_test_worker_fault"):
            await asyncio.wait_for(stream_all(llm, [5, 6, 7], params), timeout=10)
    finally:
        llm.shutdown()
    assert wait_until(lambda: not group_alive(core), timeout=5)
    assert not os.path.exists(llm.client.ipc_dir)


def test_shutdown_stops_every_child_and_removes_ipc_files(llama_dir):
    llm = AsyncLLM(llama_dir, dtype="float32", num_kv_blocks=64, tensor_parallel_size=2)
    core, workers = engine_pids(llm)
    assert len(workers) == 2
    ipc_dir = llm.client.ipc_dir
    assert os.listdir(ipc_dir)
    # the core-worker rings are unlinked once every worker has them open: even a SIGKILL of the
    # whole group leaves no shared memory behind
    assert not [name for name in os.listdir(ipc_dir) if name.startswith("worker-")]
    llm.shutdown()
    assert not group_alive(core)
    assert not os.path.exists(ipc_dir)
    assert children_of(os.getpid()) == []


def thread_affinities(pid: int) -> set[tuple[int, ...]]:
    return {tuple(sorted(os.sched_getaffinity(int(tid)))) for tid in os.listdir(f"/proc/{pid}/task")}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs a core beside the worker's")
async def test_cpu_workers_and_core_run_on_cores_of_their_own(llama_dir):
    cores = sorted(os.sched_getaffinity(0))
    llm = AsyncLLM(llama_dir, dtype="float32", num_kv_blocks=64, worker_threads=1)
    try:
        core, workers = engine_pids(llm)
        await stream_all(llm, [5, 6, 7], SamplingParams(max_tokens=2))
        assert thread_affinities(workers[0]) == {(cores[0],)}  # every thread, OpenMP's included
        assert thread_affinities(core) == {tuple(cores[1:])}  # its I/O threads too
        assert thread_affinities(os.getpid()) == {tuple(cores)}  # the caller's process is not touched
    finally:
        llm.shutdown()


def test_bad_model_path_raises_from_constructor_and_leaves_nothing():
    before = set(children_of(os.getpid()))
    with pytest.raises(OSError):
        AsyncLLM("/nonexistent/model/dir")
    assert wait_until(lambda: set(children_of(os.getpid())) <= before, timeout=5)


def test_max_model_len_beyond_the_model_raises_value_error_and_leaves_nothing(llama_dir):
    """The core starts before the frontend reads the model config; the frontend still refuses a
    limit past max_position_embeddings (2048 for the tiny model) itself, with a ValueError."""
    before = set(children_of(os.getpid()))
    with pytest.raises(ValueError, match="max_model_len must be <= the model's max_position_embeddings"):
        AsyncLLM(llama_dir, dtype="float32", num_kv_blocks=16, max_model_len=4096)
    assert wait_until(lambda: set(children_of(os.getpid())) <= before, timeout=5)


@pytest.mark.parametrize("limits", [{}, {"max_model_len": 1024}], ids=["model-max_model_len", "given"])
def test_step_budget_below_max_model_len_without_chunked_prefill_raises(llama_dir, limits):
    """Without chunked prefill, a prompt longer than one step's budget could never be scheduled
    and would block every request behind it: the engine refuses such limits when it starts."""
    before = set(children_of(os.getpid()))
    with pytest.raises(ValueError, match=r"max_num_batched_tokens must be >= max_model_len \(\d+\) when chunked"):
        AsyncLLM(llama_dir, dtype="float32", num_kv_blocks=16, enable_chunked_prefill=False,
                 max_num_batched_tokens=64, **limits)
    assert wait_until(lambda: set(children_of(os.getpid())) <= before, timeout=5)


def test_worker_that_fails_to_load_raises_with_cause_and_leaves_nothing(llama_dir, tmp_path):
    for name in os.listdir(llama_dir):
        if not name.endswith(".safetensors") and not name.endswith(".index.json"):
            os.symlink(os.path.join(llama_dir, name), tmp_path / name)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    before = set(children_of(os.getpid()))
    with pytest.raises(EngineStartupError, match="(?i)safetensors|header"):
        AsyncLLM(str(tmp_path), dtype="float32", num_kv_blocks=16)
    assert wait_until(lambda: set(children_of(os.getpid())) <= before, timeout=5)


PARENT_SCRIPT = textwrap.dedent("""
    import asyncio, os, sys
    from conveyor import AsyncLLM, SamplingParams

    async def main():
        llm = AsyncLLM(sys.argv[1], dtype="float32", num_kv_blocks=256)
        print(llm.client.proc.pid, llm.client.ipc_dir, flush=True)
        async for _ in llm.generate([5, 6, 7], SamplingParams(max_tokens=2000, ignore_eos=True)):
            print("streaming", flush=True)

    asyncio.run(main())
""")


def test_children_exit_when_parent_is_sigkilled(llama_dir):
    parent = subprocess.Popen([sys.executable, "-c", PARENT_SCRIPT, llama_dir], stdout=subprocess.PIPE, text=True)
    try:
        core, ipc_dir = parent.stdout.readline().split()
        core = int(core)
        assert wait_until(lambda: len(children_of(core)) == 1, timeout=30)
        family = [core] + descendants_of(core)
        assert parent.stdout.readline().strip() == "streaming"  # mid-generation
        parent.kill()
        parent.wait()
        assert wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in family), timeout=5)
        assert not os.path.exists(ipc_dir), "the orphaned core should remove its ipc files"
    finally:
        parent.kill()


def test_engine_works_across_successive_event_loops(llama_dir):
    llm = AsyncLLM(llama_dir, dtype="float32", num_kv_blocks=64)
    try:
        first = asyncio.run(stream_all(llm, [5, 6, 7], SamplingParams(temperature=0, max_tokens=4)))
        second = asyncio.run(stream_all(llm, [5, 6, 7], SamplingParams(temperature=0, max_tokens=4)))
        import uvloop

        third = uvloop.run(stream_all(llm, [5, 6, 7], SamplingParams(temperature=0, max_tokens=4)))
        assert first.outputs[0].token_ids == second.outputs[0].token_ids == third.outputs[0].token_ids
        assert len(first.outputs[0].token_ids) == 4
    finally:
        llm.shutdown()


async def test_long_prompts_are_tokenized_off_the_event_loop(llama_dir, monkeypatch):
    """What keeps the caller's loop responsive while many long prompts arrive (how long it waits
    under load is `conveyor bench stalls`' to measure, not a test's)."""
    llm = AsyncLLM(llama_dir, dtype="float32", num_kv_blocks=512)
    encoding_threads = []
    encode = llm.tokenizer.encode

    def recording_encode(*args, **kwargs):
        encoding_threads.append(threading.current_thread())
        return encode(*args, **kwargs)

    monkeypatch.setattr(llm.tokenizer, "encode", recording_encode)
    try:
        prompts = [" ".join(f"word{i}x{j}" for j in range(40)) for i in range(8)]
        assert min(map(len, prompts)) > TOKENIZE_OFF_LOOP_CHARS
        params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
        outs = await asyncio.gather(*(stream_all_text(llm, p, params) for p in prompts))
        assert all(len(o.outputs[0].token_ids) == 2 for o in outs)
        assert len(encoding_threads) == len(prompts) and threading.current_thread() not in encoding_threads
    finally:
        llm.shutdown()


async def stream_all_text(llm, prompt, params):
    async for out in llm.generate(prompt, params):
        pass
    return out
