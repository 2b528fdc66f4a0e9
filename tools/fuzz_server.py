"""Fuzz the OpenAI server from its own /openapi.json with schemathesis: every operation, with bodies
that fit the schema and bodies that break it. No answer may be a 5xx, none may take longer than
--request-timeout, and /health must still answer 200 afterwards.

    python -m conveyor.tools.fuzz_server [--model DIR] [--max-examples 200] [--max-time S]

Without --model it builds the tiny test model. The server runs in this process on 127.0.0.1, with
small engine limits (FUZZ_ENGINE) so that whatever the schema allows finishes in seconds.
schemathesis prints every failure with a curl command that reproduces it, then its summary.
"""

import argparse
import contextlib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

API_KEY = "fuzz"
SERVED_NAME = "fuzz-model"
# prompt + output within 64 tokens, so that n=128 of the longest request still takes seconds
FUZZ_ENGINE = {"dtype": "float32", "max_model_len": 64, "num_kv_blocks": 512, "max_num_seqs": 64}
AUTH = f"Authorization: Bearer {API_KEY}"


@contextlib.contextmanager
def serving(model: str, **engine_args) -> Iterator[str]:
    """The OpenAI server over `model` on a free port of 127.0.0.1 (uvicorn in a thread of this
    process); yields its URL, and stops server and engine on leaving."""
    import uvicorn

    from conveyor.frontend.api_server import build_app
    from conveyor.frontend.async_llm import AsyncLLM

    engine = AsyncLLM(model, **{**FUZZ_ENGINE, **engine_args})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(build_app(engine, SERVED_NAME, api_key=API_KEY), loop="uvloop",
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.shutdown()


@dataclass(slots=True)
class FuzzResult:
    passed: bool  # schemathesis found nothing and /health is 200
    returncode: int  # schemathesis's
    health: int | str  # /health's status afterwards, or why there was none
    output: str  # schemathesis's report

    def summary(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        return f"fuzz {verdict}: schemathesis exit code {self.returncode}, /health afterwards: {self.health}"


def fuzz(url: str, max_examples: int, max_time: int | None = None, request_timeout: float = 30.0,
         seed: int | None = None, workers: int = 1, hang_after: float = 1800.0) -> FuzzResult:
    """Run schemathesis against the server at `url` (every phase, positive and negative bodies,
    the not_a_server_error check) with at most `max_examples` per operation, or until `max_time`
    seconds are spent, then ask /health. A run still going after `hang_after` seconds fails."""
    command = [sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json", "--checks",
               "not_a_server_error", "--max-examples", str(max_examples), "--request-timeout",
               str(request_timeout), "--header", AUTH, "--workers", str(workers), "--suppress-health-check",
               "all", "--no-color"]
    if max_time is not None:
        command += ["--max-time", str(max_time)]
        hang_after = min(hang_after, max_time + 2 * request_timeout + 60)  # a request or two past it
    if seed is not None:
        command += ["--seed", str(seed)]
    try:
        with tempfile.TemporaryDirectory(prefix="conveyor-fuzz-") as workdir:  # for its .schemathesis cache
            run = subprocess.run(command, capture_output=True, text=True, timeout=hang_after, cwd=workdir)
        returncode, output = run.returncode, run.stdout + run.stderr
    except subprocess.TimeoutExpired as e:
        returncode, output = -1, f"schemathesis ran past {hang_after:g} s\n{e.stdout or ''}{e.stderr or ''}"
    try:
        health: int | str = httpx.get(f"{url}/health", timeout=request_timeout).status_code
    except httpx.HTTPError as e:
        health = f"no answer ({e!r})"
    return FuzzResult(returncode == 0 and health == 200, returncode, health, output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: the tiny test model, built in a temp dir)")
    parser.add_argument("--max-examples", type=int, default=200, help="examples per operation (default 200)")
    parser.add_argument("--max-time", type=int, help="seconds to spend, repeating the fuzzing until then "
                                                     "(default: stop after the examples)")
    parser.add_argument("--request-timeout", type=float, default=30.0, help="seconds one answer may take")
    parser.add_argument("--seed", type=int, help="schemathesis's seed, to repeat a run")
    parser.add_argument("--workers", type=int, default=1, help="concurrent schemathesis workers")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="conveyor-fuzz-") as tmp:
        model = args.model
        if model is None:
            from conveyor.tools.make_tiny_model import make_tiny_model

            model = str(make_tiny_model(f"{tmp}/llama", "llama"))
        with serving(model) as url:
            print(f"fuzzing {url}/openapi.json: {args.max_examples} examples per operation", flush=True)
            result = fuzz(url, args.max_examples, args.max_time, args.request_timeout, args.seed, args.workers)
    print(result.output)
    print(result.summary())
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
