"""The fault matrix: what each fault does to callers, to bystander requests and to the machine.

Every case asserts that callers get a clear error within a generous bound, that requests of others
carry on where the engine survives, and that no process and nothing in /dev/shm is left where it
does not. Rows that live elsewhere: SIGKILL of a worker or of the core, and an exception inside
the forward (test_lifecycle.py); SIGKILL of the process that spawned the core, an API server
included (test_lifecycle.py: test_children_exit_when_parent_is_sigkilled), and of one API server
of `--api-server-count` (test_multiprocess.py).
"""

import asyncio
import os
import secrets
import signal
import subprocess
import time

import httpx
import msgspec
import pytest
import torch
import zmq

from conveyor import AsyncLLM, EngineDeadError, EngineStartupError, SamplingParams
from conveyor.config import EngineConfig
from conveyor.engine_core.executor import Executor, WorkerFailure
from conveyor.ipc.messages import (
    Abort,
    EngineCoreOutputMessage,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineReady,
    Hello,
    UtilityCall,
    WorkerOutput,
)
from conveyor.ipc.serial import Decoder, Encoder
from conveyor.ipc.sockets import bound_address, make_socket
from idle import wait_idle
from procs import children_of, descendants_of, engine_pids, ipc_dirs_of, wait_until
from test_cli import CONVEYOR, ENGINE, read_port, start_serve
from test_multiprocess import CORE_ENGINE, Headless, _cmdlines, _healthy, free_port, stop

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
LONG = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)  # runs across a case's fault


SECRET = "a secret of the fault tests"


class RawPeer:
    """A bare ZeroMQ peer of the core's input port, as anything that reaches the port could be
    (with the secret: a frontend that knows it, misbehaving)."""

    def __init__(self, address: str, secret: str | None = SECRET):
        self.ctx = zmq.Context()
        self.push = make_socket(self.ctx, zmq.PUSH, address, bind=False, secret=secret)
        self.pull = make_socket(self.ctx, zmq.PULL, "tcp://127.0.0.1:0", bind=True, secret=secret)
        self.encoder, self.decoder = Encoder(), Decoder(EngineCoreOutputMessage)
        self.index = secrets.randbits(62) + 1

    def send(self, message) -> None:
        self.send_frames(self.encoder.encode(message))

    def send_frames(self, frames: list) -> None:
        self.push.send_multipart(frames, copy=False)

    def receive(self, kind: type, timeout: float):
        """The next message of `kind` from the core (heartbeats skipped), or None."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if self.pull.poll(left * 1000):
                message = self.decoder.decode(self.pull.recv_multipart())
                if isinstance(message, kind):
                    return message
        return None

    def hello(self, timeout: float = 10) -> EngineReady | None:
        self.send(Hello(self.index, bound_address(self.pull)))
        return self.receive(EngineReady, timeout)

    def close(self) -> None:
        self.ctx.destroy(linger=0)


@pytest.fixture(scope="module")
def core(llama_dir):
    """A headless core with a secret, which outlives every case it serves; its log lines are
    collected. It leaves nothing behind when it stops."""
    core = Headless(llama_dir, env={"CONVEYOR_ENGINE_SECRET": SECRET})
    assert any("with the engine secret (CurveZMQ)" in line for line in core.log)
    workers = descendants_of(core.proc.pid)
    dirs = ipc_dirs_of(workers)
    assert dirs
    yield core
    core.terminate()
    assert wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in workers), timeout=10)
    assert not any(os.path.exists(path) for path in dirs)


@pytest.fixture(scope="module")
def bystander(core, llama_dir):
    """A well-behaved frontend of `core`, whose requests must not notice the faults."""
    llm = AsyncLLM(llama_dir, engine_address=core.address, engine_secret=SECRET)
    yield llm
    llm.shutdown()


@pytest.fixture
def peer(core):
    peer = RawPeer(core.address)
    yield peer
    peer.close()


def tokens(out) -> list[int]:
    return out.outputs[0].token_ids


async def run(llm: AsyncLLM, prompt: list[int], params=GREEDY):
    return await drain(llm.generate({"prompt_token_ids": prompt}, params))


async def drain(stream):
    async for out in stream:
        pass
    return out


# ---- a peer without the secret ------------------------------------------------------------------

def test_a_peer_without_the_secret_gets_no_answer_and_is_logged(core):
    peer = RawPeer(core.address, secret=None)
    try:
        assert peer.hello(timeout=3) is None
    finally:
        peer.close()
    assert wait_until(lambda: any("refused" in line and "engine secret" in line for line in core.log), timeout=10)


def test_a_frontend_with_another_secret_fails_to_start_saying_so(core, llama_dir):
    with pytest.raises(EngineStartupError, match="refused the handshake"):
        AsyncLLM(llama_dir, engine_address=core.address, engine_secret="not the secret of the tests")


def test_a_frontend_of_a_core_beyond_loopback_needs_a_secret(llama_dir):
    with pytest.raises(ValueError, match="engine_secret must be set"):
        AsyncLLM(llama_dir, engine_address="tcp://192.0.2.1:5570")


def test_a_core_listening_beyond_loopback_needs_a_secret(llama_dir):
    env = {k: v for k, v in os.environ.items() if k != "CONVEYOR_ENGINE_SECRET"}
    proc = subprocess.Popen(CONVEYOR + ["serve", llama_dir, "--headless", "--host", "0.0.0.0", "--engine-port",
                                        str(free_port()), *CORE_ENGINE], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        stop(proc)
    assert proc.returncode != 0 and "engine_secret must be set" in err


# ---- a malformed message on the core's input socket ---------------------------------------------

def tensor_call(frames_kept: int) -> list:
    """A UtilityCall carrying a tensor, with only the first `frames_kept` of its frames."""
    return Encoder().encode(UtilityCall(1, "stats", [torch.arange(4)], 7))[:frames_kept]


REQUEST = Encoder().encode(EngineCoreRequest("r", [5, 6, 7], GREEDY, 0.0, 7))[0]
MALFORMED = {
    "garbage": [b"\x93not a message"],
    "empty": [b""],
    "truncated": [REQUEST[: len(REQUEST) // 2]],
    "wrong field types": [msgspec.msgpack.encode(["req", 5, "not token ids", {}, "not a time"])],
    "unknown tag": [msgspec.msgpack.encode(["no-such-message", 1])],
    "tensor without its side frame": tensor_call(1),
    "tensor where none belongs": tensor_call(2),
    "Hello with a malformed output address": Encoder().encode(Hello(7, "nowhere")),
}


@pytest.mark.parametrize("frames", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_message_is_dropped_and_logged_and_the_core_serves_on(core, bystander, peer, frames):
    running = asyncio.create_task(run(bystander, [5, 6, 7], LONG))
    dropped = sum("dropped a malformed message" in line for line in core.log)
    peer.send_frames(frames)
    assert wait_until(lambda: sum("dropped a malformed message" in line for line in core.log) > dropped,
                      timeout=30), "".join(core.log[-20:])
    assert len(tokens(await asyncio.wait_for(run(bystander, [8, 9]), timeout=60))) == GREEDY.max_tokens
    assert len(tokens(await asyncio.wait_for(running, timeout=120))) == LONG.max_tokens


async def test_a_request_with_token_ids_beyond_the_vocabulary_fails_alone(bystander, peer):
    assert peer.hello() is not None
    running = asyncio.create_task(run(bystander, [5, 6, 7], LONG))
    peer.send(EngineCoreRequest("beyond", [5, 10**6], GREEDY, time.time(), peer.index))
    answer = await asyncio.to_thread(peer.receive, EngineCoreOutputs, 30)
    assert answer is not None and answer.outputs[0].finish_reason == "error"
    assert "prompt_token_ids must hold token ids in [0, 1024)" in answer.outputs[0].error
    assert len(tokens(await asyncio.wait_for(running, timeout=120))) == LONG.max_tokens


async def test_a_frontend_cannot_abort_another_frontends_request(bystander, peer):
    assert peer.hello() is not None
    stream = bystander.generate({"prompt_token_ids": [5, 6, 7]}, LONG, request_id="mine")
    await anext(stream)
    peer.send(Abort(["mine"], peer.index))

    async def rest():
        async for out in stream:
            pass
        return out

    out = await asyncio.wait_for(rest(), timeout=120)
    assert out.outputs[0].finish_reason == "length" and len(tokens(out)) == LONG.max_tokens


# ---- faults one engine survives (an engine of the test's own process) ---------------------------

SHORT_PEER_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def engine(llama_dir):
    """A small KV cache (16 blocks of 16 tokens), shared by the cases it survives; its core forgets
    a silent frontend after SHORT_PEER_TIMEOUT_S. It leaves nothing behind when it shuts down."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CONVEYOR_PEER_TIMEOUT_S", str(SHORT_PEER_TIMEOUT_S))
        llm = AsyncLLM(llama_dir, dtype="float32", num_kv_blocks=16, max_num_seqs=256)
    core, workers = engine_pids(llm)
    yield llm
    llm.shutdown()
    assert wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in [core, *workers]), timeout=10)
    assert not os.path.exists(llm.client.ipc_dir)


async def test_a_request_larger_than_the_kv_cache_fails_alone(engine):
    prompts = [list(range(3 + i, 43 + i)) for i in range(4)]  # 4 x (40 + 40) tokens: more than the cache
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    alone = [tokens(await run(engine, prompt, params)) for prompt in prompts]
    bystanders = [asyncio.create_task(run(engine, prompt, params)) for prompt in prompts]
    too_large = await asyncio.wait_for(run(engine, list(range(3, 203)), SamplingParams(max_tokens=100)), timeout=60)
    assert too_large.outputs[0].finish_reason == "error" and "exceed the whole KV cache" in too_large.error_message
    assert [tokens(out) for out in await asyncio.wait_for(asyncio.gather(*bystanders), timeout=120)] == alone
    stats = await wait_idle(engine)
    assert stats["num_running"] == stats["num_waiting"] == 0 and stats["kv_cache_usage"] == 0


async def test_a_thousand_callers_leaving_mid_stream_leave_the_engine_idle_and_bystanders_whole(engine):
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    alone = tokens(await run(engine, [9, 8, 7], params))
    bystander = asyncio.create_task(run(engine, [9, 8, 7], params))
    started = [asyncio.Event() for _ in range(1000)]

    async def leave_mid_stream(i: int) -> None:
        async for _ in engine.generate({"prompt_token_ids": [3 + i % 500, 4, 5]}, LONG):
            started[i].set()

    callers = [asyncio.create_task(leave_mid_stream(i)) for i in range(1000)]
    for caller, event in zip(callers, started):
        await asyncio.wait_for(event.wait(), timeout=60)
        caller.cancel()
    await asyncio.gather(*callers, return_exceptions=True)
    assert tokens(await asyncio.wait_for(bystander, timeout=60)) == alone
    stats = await wait_idle(engine, timeout=30)
    assert stats["num_running"] == stats["num_waiting"] == 0 and stats["kv_cache_usage"] == 0
    assert not engine.output_processor.states


async def test_a_hello_claiming_the_spawning_frontends_index_is_dropped(engine):
    peer = RawPeer(bound_address(engine.client.input_socket), secret=None)
    try:
        peer.send(Hello(0, bound_address(peer.pull)))
        running = asyncio.create_task(run(engine, [5, 6, 7], LONG))
        await asyncio.sleep(SHORT_PEER_TIMEOUT_S + 1)  # the core would now forget a silent client 0
        assert len(tokens(await asyncio.wait_for(running, timeout=60))) == LONG.max_tokens
        assert len(tokens(await asyncio.wait_for(run(engine, [8, 9]), timeout=60))) == GREEDY.max_tokens
    finally:
        peer.close()


async def test_a_malformed_message_on_a_frontends_output_socket_is_dropped(engine):
    intruder = zmq.Context()
    sock = make_socket(intruder, zmq.PUSH, bound_address(engine.client.output_socket), bind=False)
    try:
        running = asyncio.create_task(run(engine, [5, 6, 7], LONG))
        for frames in MALFORMED.values():
            sock.send_multipart(frames)
        assert len(tokens(await asyncio.wait_for(running, timeout=60))) == LONG.max_tokens
        assert not engine.is_dead
    finally:
        intruder.destroy(linger=0)


# ---- a worker that hangs, or talks nonsense -----------------------------------------------------

def worker_of_rank(core: int, rank: int) -> int:
    for pid in children_of(core):
        with open(f"/proc/{pid}/environ", "rb") as f:
            if f"CONVEYOR_PROCESS_NAME=worker-{rank}".encode() in f.read().split(b"\0"):
                return pid
    raise LookupError(f"no worker of rank {rank}")


async def test_a_hung_worker_ends_the_engine_naming_its_rank_and_leaves_nothing(llama_dir):
    llm = AsyncLLM(llama_dir, dtype="float32", num_kv_blocks=64, tensor_parallel_size=2, step_timeout=2)
    core, workers = engine_pids(llm)
    ipc_dir = llm.client.ipc_dir
    try:
        stream = llm.generate({"prompt_token_ids": [5, 6, 7]}, LONG)
        await anext(stream)
        os.kill(worker_of_rank(core, 1), signal.SIGSTOP)
        with pytest.raises(EngineDeadError, match=r"worker rank 1 hung \(stopped\): .* 2 s \(step_timeout\)"):
            await asyncio.wait_for(drain(stream), timeout=30)
    finally:
        llm.shutdown()
        for pid in workers:  # whatever the engine left: kill it, so the assertions below fail cleanly
            if os.path.exists(f"/proc/{pid}"):
                os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in [core, *workers]), timeout=10)
    assert not os.path.exists(ipc_dir)


class OneMessageRing:
    def __init__(self, frames: list):
        self.frames = frames

    def recv(self, timeout, alive, spin_s):
        return self.frames


def test_a_malformed_message_from_a_worker_is_a_failure_naming_its_rank():
    executor = Executor.__new__(Executor)  # no processes: only the ring it reads
    executor.config, executor.spin_s, executor.workers = EngineConfig(model="unused"), 0.0, []
    executor.decoder = Decoder(WorkerOutput)
    executor.results = [OneMessageRing([b"\x93garbage"])]
    with pytest.raises(WorkerFailure, match="worker rank 0 sent a malformed message"):
        executor.collect()


# ---- SIGKILL of the `--api-server-count` supervisor ----------------------------------------------

def test_a_killed_api_server_supervisor_takes_its_children_down_and_leaves_nothing(llama_dir):
    proc = start_serve(llama_dir, "--api-server-count", "2", "--port", "0", "--served-model-name", "tiny", *ENGINE)
    everything: list[int] = []
    try:
        port = read_port(proc, timeout=180)
        assert wait_until(lambda: len(_cmdlines(proc.pid, "conveyor.frontend.launcher")) == 2, timeout=60)
        assert wait_until(lambda: _healthy(port, 1), timeout=120)
        everything = descendants_of(proc.pid)
        dirs = ipc_dirs_of([proc.pid, *everything])
        core = _cmdlines(proc.pid, "conveyor.engine_core")[0]
        core_dirs = ipc_dirs_of([core, *descendants_of(core)])
        assert dirs and core_dirs
        body = {"model": "tiny", "prompt": "Hi", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with pytest.raises(httpx.TransportError):  # the stream breaks off: no [DONE]
            with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30) as response:
                lines = response.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))
                proc.kill()  # the supervisor alone, as the OOM killer would
                assert "data: [DONE]" not in list(lines)
        assert wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in everything), timeout=10)
        left = {path for path in dirs if os.path.exists(path)}
        assert not left
    finally:
        stop(proc)
        for pid in everything:
            if os.path.exists(f"/proc/{pid}"):
                os.kill(pid, signal.SIGKILL)
