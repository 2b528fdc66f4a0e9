"""One engine core, several frontends: a --headless core over TCP, frontends in other processes,
heartbeats both ways, and `conveyor serve --api-server-count` / `--engine-address`."""

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conveyor import AsyncLLM, EngineDeadError, SamplingParams
from conveyor.frontend import core_client
from procs import descendants_of, engine_ipc_dirs, ipc_dirs_of, wait_until
from test_cli import CONVEYOR, ENGINE, read_port, start_serve

PEER_TIMEOUT_S = 2.0  # both sides' silence limit in these tests (CONVEYOR_PEER_TIMEOUT_S)
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
LONG = SamplingParams(temperature=0.0, max_tokens=1500, ignore_eos=True)  # runs for seconds
CORE_ENGINE = ["--dtype", "float32", "--num-kv-blocks", "512", "--max-model-len", "1536"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Headless:
    """A `conveyor serve --headless` process; its log lines are collected as they come."""

    def __init__(self, model: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            CONVEYOR + ["serve", model, "--headless", "--engine-port", str(self.port), "--log-level", "info"]
            + CORE_ENGINE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
            env={**os.environ, "CONVEYOR_PEER_TIMEOUT_S": str(PEER_TIMEOUT_S), **(env or {})})
        self.log: list[str] = []
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()
        assert wait_until(lambda: any("engine core ready" in line for line in self.log) or self.proc.poll() is not None,
                          timeout=180)
        assert self.proc.poll() is None, "".join(self.log)

    def terminate(self) -> None:
        """SIGTERM, which the core must answer by exiting cleanly; anything left is killed."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            assert self.proc.wait(30) == 0
        finally:
            stop(self.proc)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory) -> str:
    """Big enough that a 1500-token request runs for several PEER_TIMEOUT_S, small enough to load fast."""
    from conveyor.tools.make_tiny_model import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("slow") / "llama", "llama", num_layers=6, hidden_size=384,
                               intermediate_size=1536, num_heads=6, num_kv_heads=2))


@pytest.fixture(scope="module")
def headless_core(slow_model):
    core = Headless(slow_model)
    yield core
    core.terminate()


@pytest.fixture
def headless(headless_core) -> str:
    return headless_core.address


@pytest.fixture
def short_peer_timeout(monkeypatch):
    monkeypatch.setattr(core_client, "PEER_TIMEOUT_S", PEER_TIMEOUT_S)


async def tokens(llm: AsyncLLM, prompt: str, request_id: str, params=GREEDY) -> list[int]:
    final = None
    async for out in llm.generate(prompt, params, request_id=request_id):
        final = out
    return final.outputs[0].token_ids


PROMPTS_A = ["The quick brown fox", "Once upon a time", "In the beginning", "A B C D"]
PROMPTS_B = ["Numbers: 1 2 3", "Hello there", "def main():", "Lorem ipsum dolor"]


async def test_two_frontends_share_a_headless_core_and_each_gets_only_its_own_outputs(slow_model, headless):
    async with AsyncLLM(slow_model, engine_address=headless) as a, AsyncLLM(slow_model, engine_address=headless) as b:
        assert a.client.client_index != b.client.client_index
        assert a.max_model_len == 1536  # the core's limit (--max-model-len), not the model's 2048
        # interleaved on one core, with the same request ids on both sides but different prompts
        together = await asyncio.gather(
            *(tokens(a, p, f"a{i}") for i, p in enumerate(PROMPTS_A)),
            *(tokens(b, p, f"b{i}") for i, p in enumerate(PROMPTS_B)))
        alone = [await tokens(a, p, f"solo{i}") for i, p in enumerate(PROMPTS_A + PROMPTS_B)]
    assert together == alone
    assert len({tuple(t) for t in together}) == len(together)  # a mix-up would duplicate some


async def test_a_request_id_already_running_for_another_frontend_is_rejected(slow_model, headless):
    async with AsyncLLM(slow_model, engine_address=headless) as a, AsyncLLM(slow_model, engine_address=headless) as b:
        stream = a.generate("hold this id", LONG, request_id="shared-id")
        first = await anext(stream)  # running now
        assert not first.finished
        rejected = None
        async for out in b.generate("me too", GREEDY, request_id="shared-id"):
            rejected = out
        assert rejected.finished and "already in use" in rejected.error_message
        await stream.aclose()


async def test_malformed_messages_on_the_core_port_are_dropped_and_it_serves_on(slow_model, headless_core):
    import zmq

    from conveyor.ipc.messages import EngineCoreRequest
    from conveyor.ipc.serial import Encoder

    ctx = zmq.Context()
    peer = ctx.socket(zmq.PUSH)
    peer.connect(headless_core.address)
    try:
        peer.send(b"\x93not a message")
        # decodes, but a block of token ids past int64 cannot be hashed for the prefix cache
        huge = EngineCoreRequest("huge", [2**63] * 16, SamplingParams(), time.time(), 99)
        peer.send_multipart(Encoder().encode(huge))
        assert wait_until(lambda: sum("dropped a malformed message" in line for line in headless_core.log) >= 2,
                          timeout=30), "".join(headless_core.log)
    finally:
        peer.close(0)
        ctx.term()
    async with AsyncLLM(slow_model, engine_address=headless_core.address) as llm:
        assert len(await asyncio.wait_for(tokens(llm, "still here", "after"), timeout=60)) == GREEDY.max_tokens


async def test_the_core_aborts_the_requests_of_a_frontend_that_vanished(slow_model, headless_core):
    dirs_before = engine_ipc_dirs()
    script = (
        "import asyncio\n"
        "from conveyor import AsyncLLM, SamplingParams\n"
        "async def main():\n"
        f"    llm = AsyncLLM({slow_model!r}, engine_address={headless_core.address!r})\n"
        "    params = SamplingParams(temperature=0.0, max_tokens=1500, ignore_eos=True)\n"
        "    async for out in llm.generate('never finishes', params):\n"
        "        print('streaming', flush=True)\n"
        "asyncio.run(main())\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    async with AsyncLLM(slow_model, engine_address=headless_core.address) as observer:
        try:
            assert child.stdout.readline().strip() == "streaming"
            assert (await observer.get_stats())["num_running"] == 1
            stop(child)  # SIGKILL: no Goodbye, only silence
            start = time.monotonic()
            assert await asyncio.wait_for(_until_idle(observer), timeout=PEER_TIMEOUT_S + 5)
            assert time.monotonic() - start > PEER_TIMEOUT_S / 2  # not finished: aborted after the silence
            assert wait_until(lambda: any("was silent" in line and "aborted its 1 requests" in line
                                          for line in headless_core.log), timeout=5)
        finally:
            stop(child)
    assert engine_ipc_dirs() <= dirs_before  # a frontend of a tcp:// core keeps no files, so leaves none


async def test_shutdown_of_a_frontend_aborts_its_requests_at_once(slow_model, headless):
    async with AsyncLLM(slow_model, engine_address=headless) as observer:
        leaving = AsyncLLM(slow_model, engine_address=headless)
        stream = leaving.generate("bye", LONG)
        await anext(stream)
        leaving.shutdown()  # Goodbye
        assert await asyncio.wait_for(_until_idle(observer), timeout=PEER_TIMEOUT_S / 2)


async def _until_idle(llm: AsyncLLM) -> bool:
    while (await llm.get_stats())["num_running"]:
        await asyncio.sleep(0.05)
    return True


def test_no_core_at_the_address_fails_the_constructor(llama_dir, short_peer_timeout):
    with pytest.raises(Exception, match="no engine core answered at tcp://127.0.0.1"):
        AsyncLLM(llama_dir, engine_address=f"tcp://127.0.0.1:{free_port()}")


async def test_frontend_raises_engine_dead_when_the_headless_core_is_killed(slow_model, short_peer_timeout):
    core = Headless(slow_model)
    try:
        async with AsyncLLM(slow_model, engine_address=core.address) as llm:
            stream = llm.generate("x", LONG)
            await anext(stream)
            dirs = ipc_dirs_of([core.proc.pid, *descendants_of(core.proc.pid)])
            assert dirs
            core.proc.kill()  # SIGKILL, the core alone (as the OOM killer would): it says nothing
            start = time.monotonic()
            with pytest.raises(EngineDeadError, match="no heartbeat from the engine core"):
                async for _ in stream:
                    pass
            assert time.monotonic() - start < PEER_TIMEOUT_S + 2
    finally:
        stop(core.proc)
    # the killed core could not remove its directory: its workers do, as their lifeline closes
    assert wait_until(lambda: not any(os.path.exists(path) for path in dirs), timeout=10), dirs


async def test_sigterm_of_the_headless_core_tells_its_frontends_and_exits_zero(slow_model):
    core = Headless(slow_model)
    try:
        async with AsyncLLM(slow_model, engine_address=core.address) as llm:
            stream = llm.generate("x", LONG)
            await anext(stream)
            workers = descendants_of(core.proc.pid)
            assert workers
            core.proc.send_signal(signal.SIGTERM)
            with pytest.raises(EngineDeadError, match="engine core was shut down"):
                async for _ in stream:
                    pass
        assert core.proc.wait(30) == 0
        assert wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in workers), timeout=10)
    finally:
        stop(core.proc)


def test_serve_with_engine_address_answers_over_http(slow_model, headless):
    address = headless.removeprefix("tcp://")
    proc = start_serve(slow_model, "--engine-address", address, "--port", "0", "--served-model-name", "tiny")
    try:
        port = read_port(proc, timeout=120)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": "Hello", "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 5
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        stop(proc)


def test_api_server_count_runs_k_servers_on_one_port_and_one_core(llama_dir):
    proc = start_serve(llama_dir, "--api-server-count", "2", "--port", "0", "--served-model-name", "tiny",
                       "--log-level", "info", *ENGINE)
    try:
        port = read_port(proc, timeout=180)
        wait_until(lambda: len(_cmdlines(proc.pid, "conveyor.frontend.launcher")) == 2, timeout=60)
        servers = _cmdlines(proc.pid, "conveyor.frontend.launcher")
        assert len(servers) == 2 and len(_cmdlines(proc.pid, "conveyor.engine_core")) == 1
        assert wait_until(lambda: _healthy(port, 8), timeout=120)

        async def many() -> list[int]:
            async with httpx.AsyncClient(timeout=120) as client:
                replies = await asyncio.gather(*(client.post(
                    f"http://127.0.0.1:{port}/v1/completions",
                    json={"model": "tiny", "prompt": f"Request {i}", "max_tokens": 4, "temperature": 0})
                    for i in range(16)))
            return [r.status_code for r in replies]

        assert asyncio.run(many()) == [200] * 16
        # whichever server answers the scrape counts the requests of both
        for _ in range(4):
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            line = next(x for x in text.splitlines() if x.startswith("conveyor_request_success_total{"))
            assert 'finished_reason="length"' in line and float(line.rsplit(" ", 1)[1]) == 16.0
        everything = descendants_of(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in everything), timeout=10)
    finally:
        stop(proc)


def test_api_server_count_exits_nonzero_when_a_server_dies(llama_dir):
    proc = start_serve(llama_dir, "--api-server-count", "2", "--port", "0", *ENGINE)
    try:
        read_port(proc, timeout=180)
        assert wait_until(lambda: len(_cmdlines(proc.pid, "conveyor.frontend.launcher")) == 2, timeout=60)
        everything = descendants_of(proc.pid)
        os.kill(_cmdlines(proc.pid, "conveyor.frontend.launcher")[0], signal.SIGKILL)
        assert proc.wait(60) == 1
        assert wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in everything), timeout=10)
    finally:
        stop(proc)


def test_sigkill_of_the_api_server_supervisor_leaves_no_ipc_dirs(llama_dir):
    # the supervisor's (the core's sockets and rings, the servers' metrics) and each API server's own
    assert_sigkill_leaves_no_ipc_dirs(start_serve(llama_dir, "--api-server-count", "2", "--port", "0", *ENGINE),
                                      held=3)


def test_sigkill_of_the_supervisor_of_servers_for_a_headless_core_leaves_no_ipc_dirs(slow_model, headless):
    address = headless.removeprefix("tcp://")
    # the supervisor's, with the servers' metrics (a tcp:// link needs no directory)
    assert_sigkill_leaves_no_ipc_dirs(start_serve(slow_model, "--engine-address", address, "--api-server-count", "2",
                                                  "--port", "0"), held=1)


def assert_sigkill_leaves_no_ipc_dirs(proc: subprocess.Popen, held: int) -> None:
    """SIGKILL the supervisor `proc` once its processes hold `held` ipc directories: none may remain."""
    try:
        read_port(proc, timeout=180)
        assert wait_until(lambda: len(ipc_dirs_of(descendants_of(proc.pid))) == held, timeout=120)
        everything = descendants_of(proc.pid)
        dirs = ipc_dirs_of(everything)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in everything), timeout=10)
        assert not [d for d in dirs if os.path.exists(d)]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # API servers that outlived it would still be in its group
        proc.wait()


def _cmdlines(root: int, needle: str) -> list[int]:
    found = []
    for pid in descendants_of(root):
        try:
            with open(f"/proc/{pid}/cmdline") as f:
                if needle in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found


def _healthy(port: int, tries: int) -> bool:
    """Every one of `tries` /health calls answers 200 (they land on either server)."""
    try:
        return all(httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200 for _ in range(tries))
    except httpx.HTTPError:
        return False
