"""Online serving: a load generator for any OpenAI-compatible server's streaming /v1/completions.

    python -m conveyor.tools.bench_serving --base-url http://127.0.0.1:8000 --model-dir DIR \\
        --num-prompts 64 --input-len 128 --output-len 128 --request-rate 4 --max-concurrency 16 \\
        --out bench_results/serving.json

or, to start the server too (on a free loopback port; stopped with every process it started):

    python -m conveyor.tools.bench_serving --backend conveyor|vllm --model DIR [--dtype bfloat16] ...

`--backend vllm` runs vLLM's server from its virtualenv (tools/setup_vllm_cpu.sh), tuned as in
bench_common.vllm_env (tcmalloc, OpenMP threads on every core).

Requests arrive as a Poisson process (or at a fixed rate) of --request-rate per second (inf: all at
once), at most --max-concurrency in flight. Each asks for exactly --output-len tokens (ignore_eos)
with a prompt of random token ids (or --dataset). Reports TTFT, TPOT, ITL and E2E latency at
p50/p90/p99 and output tokens/s; writes JSON, and a PNG of the distributions when matplotlib is
installed. Only loopback servers are accepted. The HTTP client is the standard library's asyncio.
"""

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import pathlib
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from conveyor.tools import bench_common as bc

METRICS = (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"), ("e2e_s", "E2E"))
MAX_ERROR_BODY = 2000
# How long a served engine gets to stop by itself on SIGTERM (and remove its files) before the
# benchmark kills what is left of it.
SERVER_STOP_S = 10.0


@dataclass(slots=True)
class RequestResult:
    ok: bool = False
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""


def loopback_address(base_url: str) -> tuple[str, int, str]:
    url = urllib.parse.urlsplit(base_url)
    if url.scheme != "http" or not url.hostname:
        raise ValueError(f"base url must be http://HOST:PORT, got {base_url!r}")
    host = url.hostname
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"only loopback servers (127.0.0.0/8, ::1, localhost) may be targeted, got {host!r}")
    return host, url.port or 80, url.path.rstrip("/")


async def http_request(host: str, port: int, method: str, path: str, payload: dict | None = None):
    """Send one request; return (status, reader positioned at the body, headers, writer)."""
    reader, writer = await asyncio.open_connection(host, port)
    body = json.dumps(payload).encode() if payload is not None else b""
    head = (f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    writer.write(head.encode() + body)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, reader, headers, writer


async def body_pieces(reader: asyncio.StreamReader, headers: dict):
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while size := int((await reader.readline()).split(b";")[0], 16):
            yield await reader.readexactly(size)
            await reader.readexactly(2)
    else:
        while data := await reader.read(65536):
            yield data


async def get_json(host: str, port: int, path: str) -> dict:
    status, reader, headers, writer = await http_request(host, port, "GET", path)
    try:
        body = b"".join([piece async for piece in body_pieces(reader, headers)])
    finally:
        writer.close()
    if status != 200:
        raise RuntimeError(f"GET {path}: HTTP {status}: {body[:MAX_ERROR_BODY]!r}")
    return json.loads(body)


async def stream_completion(host: str, port: int, path: str, payload: dict) -> RequestResult:
    result, start = RequestResult(), time.perf_counter()
    arrivals, usage_tokens = [], None
    status, reader, headers, writer = await http_request(host, port, "POST", path, payload)
    try:
        if status != 200:
            body = b"".join([piece async for piece in body_pieces(reader, headers)])
            result.error = f"HTTP {status}: {body[:MAX_ERROR_BODY].decode(errors='replace')}"
            return result
        buffer = b""
        async for piece in body_pieces(reader, headers):
            buffer += piece
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                line = line.strip()
                if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                    continue
                event = json.loads(line[5:])
                if event.get("error"):
                    result.error = json.dumps(event["error"])[:MAX_ERROR_BODY]
                    return result
                if event.get("choices"):
                    arrivals.append(time.perf_counter() - start)
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens")
    finally:
        writer.close()
    if not arrivals:
        result.error = "the stream carried no choices"
        return result
    result.ok, result.ttft_s, result.e2e_s = True, arrivals[0], arrivals[-1]
    result.output_tokens = usage_tokens if usage_tokens is not None else len(arrivals)
    result.itl_s = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return result


def arrival_gaps(num: int, rate: float, arrival: str, seed: int) -> list[float]:
    if rate == float("inf"):
        return [0.0] * num
    rng = random.Random(seed)
    return [rng.expovariate(rate) if arrival == "poisson" else 1.0 / rate for _ in range(num)]


async def run_load(args: argparse.Namespace, prompts: list, model_name: str) -> tuple[list[RequestResult], float]:
    host, port, prefix = loopback_address(args.base_url)
    limit = asyncio.Semaphore(args.max_concurrency or len(prompts))

    async def one(prompt) -> RequestResult:
        payload = {"model": model_name, "prompt": prompt, "max_tokens": args.output_len, "temperature": 0.0,
                   "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        async with limit:
            try:
                return await asyncio.wait_for(stream_completion(host, port, f"{prefix}/v1/completions", payload),
                                              args.request_timeout)
            except (OSError, asyncio.TimeoutError, ValueError, asyncio.IncompleteReadError) as e:
                return RequestResult(error=f"{type(e).__name__}: {e}")

    tasks, start = [], time.perf_counter()
    for prompt, gap in zip(prompts, arrival_gaps(len(prompts), args.request_rate, args.arrival, args.seed)):
        await asyncio.sleep(gap)
        tasks.append(asyncio.create_task(one(prompt)))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


def summarize(results: list[RequestResult], duration: float) -> tuple[dict, dict]:
    done = [r for r in results if r.ok]
    values = {"ttft_s": [r.ttft_s for r in done], "e2e_s": [r.e2e_s for r in done],
              "tpot_s": [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in done if r.output_tokens > 1],
              "itl_s": [gap for r in done for gap in r.itl_s]}
    output_tokens = sum(r.output_tokens for r in done)
    summary = {"completed": len(done), "failed": len(results) - len(done), "duration_s": duration,
               "requests_per_s": len(done) / duration, "output_tok_per_s": output_tokens / duration,
               "output_tokens": output_tokens}
    for key, _ in METRICS:
        for q in (50, 90, 99):
            summary[f"{key[:-2]}_ms_p{q}"] = bc.percentile(values[key], q) * 1e3
        summary[f"{key[:-2]}_ms_mean"] = sum(values[key]) / len(values[key]) * 1e3 if values[key] else None
    return summary, values


def plot(values: dict, path: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib, or the bench extra): no plot written"
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, name) in zip(axes.flat, METRICS):
        data = [v * 1e3 for v in values[key]]
        if data:
            ax.hist(data, bins=min(50, max(5, len(data) // 4)))
        ax.set_title(f"{name} (ms, n={len(data)})")
        ax.set_xlabel("ms")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def server_command(args: argparse.Namespace, port: int) -> tuple[list[str], dict[str, str]]:
    """The command line and extra environment that serve args.model with args.backend (with the
    engine limits of bench_compare's args, when it is the caller)."""
    address = ["--host", "127.0.0.1", "--port", str(port), "--dtype", args.dtype]
    address += [f"--{name.replace('_', '-')}={value}" for name, value in bc.engine_args(args).items()]
    if args.backend == "conveyor":
        return ([sys.executable, "-m", "conveyor.frontend.cli", "serve", args.model, *address,
                 "--kv-cache-memory", f"{args.kv_cache_gib}GiB", "--log-level", "warning"], {})
    python = pathlib.Path(args.vllm_venv) / "bin" / "python"
    if not python.exists():
        raise bc.BenchError(f"no vLLM virtualenv at {args.vllm_venv}: run tools/setup_vllm_cpu.sh first")
    tuned = getattr(args, "vllm_config", "tuned") == "tuned"
    return ([str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", args.model, *address],
            {**bc.vllm_env(tuned=tuned, kv_cache_gib=args.kv_cache_gib), **bc.vllm_extra_env(args)})


@contextlib.contextmanager
def served(args: argparse.Namespace) -> Iterator[tuple[str, float]]:
    """Start args.backend's server on a free loopback port and wait until /health answers; yield
    (base url, seconds it took to start). On the way out (SIGTERM included) it gets SERVER_STOP_S
    to stop by itself, then whatever is left of its process tree is killed."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command, env = server_command(args, port)
    with tempfile.TemporaryFile() as log, bc.sigterm_as_exit():  # a SIGTERM still stops the server
        start = time.perf_counter()
        proc = subprocess.Popen(command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            while not healthy(port):
                if proc.poll() is not None or time.perf_counter() - start > args.startup_timeout:
                    log.seek(0)
                    tail = log.read()[-3000:].decode(errors="replace")
                    why = (f"exited with code {proc.returncode}" if proc.poll() is not None
                           else f"did not answer /health within {args.startup_timeout:.0f} s")
                    raise bc.BenchError(f"the {args.backend} server {why}:\n{tail}")
                time.sleep(0.5)
            yield f"http://127.0.0.1:{port}", time.perf_counter() - start
        finally:
            bc.kill_group(proc, grace=SERVER_STOP_S)


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def build_prompts(args: argparse.Namespace) -> list:
    if args.dataset:
        return bc.load_dataset(args.dataset, args.model_dir, args.num_prompts)
    return bc.random_prompts(args.num_prompts, args.input_len, bc.model_vocab_size(args.model_dir), args.seed)


def run_serving(args: argparse.Namespace) -> tuple[list[RequestResult], float]:
    """Load the server at args.base_url, or start args.backend's for the run (setting base_url and
    server_startup_s in args); the requests' results and the run's duration."""
    args.server_startup_s = None
    prompts = build_prompts(args)
    with served(args) if args.backend else contextlib.nullcontext((args.base_url, None)) as (url, startup):
        args.base_url, args.server_startup_s = url, startup
        host, port, prefix = loopback_address(url)
        model_name = args.served_model_name or asyncio.run(get_json(host, port, f"{prefix}/v1/models"))["data"][0]["id"]
        return asyncio.run(run_load(args, prompts, model_name))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="a running server to load")
    parser.add_argument("--backend", choices=("conveyor", "vllm"),
                        help="start this server for the run instead (needs --model)")
    parser.add_argument("--model", help="with --backend: the model directory to serve")
    parser.add_argument("--dtype", default="bfloat16", choices=("auto", "bfloat16", "float16", "float32"),
                        help="with --backend")
    parser.add_argument("--kv-cache-gib", type=int, default=2, help="with --backend: KV cache size")
    parser.add_argument("--vllm-venv", default=str(bc.DEFAULT_VLLM_VENV), help="with --backend vllm")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="with --backend: seconds")
    parser.add_argument("--model-dir", help="the served model's directory (vocab, tokenizer; default: --model)")
    parser.add_argument("--served-model-name", help="the request's 'model' field (default: the server's first)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--dataset", help="JSON lines of {'prompt': ...} or {'prompt_token_ids': [...]}")
    parser.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (inf: all at once)")
    parser.add_argument("--arrival", choices=("poisson", "fixed"), default="poisson")
    parser.add_argument("--max-concurrency", type=int, help="requests in flight at most")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the results here as JSON")
    parser.add_argument("--plot", help="PNG of the latency distributions (default: --out with .png)")
    args = parser.parse_args(argv)
    if args.backend and not args.model:
        parser.error("--backend needs --model, the model directory to serve")
    args.model_dir = args.model_dir or args.model
    if not args.model_dir:
        parser.error("--model-dir is required: the served model's directory (for its vocabulary)")
    try:
        results, duration = run_serving(args)
    except (ValueError, OSError, RuntimeError, bc.BenchError) as e:
        sys.exit(f"error: {e}")
    if args.backend:
        print(f"{args.backend} server ready after {args.server_startup_s:.1f} s")
    summary, values = summarize(results, duration)
    rows = [{"metric": name, **{f"p{q}": summary[f"{key[:-2]}_ms_p{q}"] for q in (50, 90, 99)},
             "mean": summary[f"{key[:-2]}_ms_mean"]} for key, name in METRICS]
    bc.print_table(rows, [("metric", "ms"), ("p50", "p50"), ("p90", "p90"), ("p99", "p99"), ("mean", "mean")])
    print(f"completed {summary['completed']}, failed {summary['failed']} in {duration:.1f} s: "
          f"{summary['requests_per_s']:.2f} req/s, {summary['output_tok_per_s']:.1f} output tok/s")
    errors = sorted({r.error for r in results if not r.ok})
    for error in errors[:5]:
        print(f"error: {error}", file=sys.stderr)
    plot_path = args.plot or (args.out.rsplit(".", 1)[0] + ".png" if args.out else None)
    note = plot(values, plot_path) if plot_path else None
    if note:
        print(f"note: {note}")
    args.request_rate = str(args.request_rate)  # JSON has no inf
    bc.write_json(args.out, {"benchmark": "serving", "machine": bc.machine_info(), "args": vars(args),
                             "summary": summary, "errors": errors, "plot": None if note else plot_path,
                             "requests": [asdict(r) for r in results]})
    if summary["completed"] == 0:
        sys.exit("error: no request completed")


if __name__ == "__main__":
    main()
