"""The `conveyor` command.

    conveyor serve MODEL [--port 8000] [--api-key KEY] ...     OpenAI-compatible server
    conveyor generate MODEL "prompt" [--max-tokens 64] ...     stream one generation to the terminal
    conveyor bench SUB [args...]                               run conveyor.tools.bench_SUB

MODEL is a local Hugging Face directory or a hub id (downloaded when it is not a local directory).
"""

import argparse
import asyncio
import importlib
import logging
import os
import re
import sys
from typing import Any

import msgspec

from conveyor.config import GiB, RequestLimits

DEFAULT_MAX_REQUEST_BYTES = 16 << 20

logger = logging.getLogger(__name__)

SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
              "mib": 1 << 20, "g": GiB, "gb": GiB, "gib": GiB, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
ENGINE_ARGS = ("tokenizer", "dtype", "tensor_parallel_size", "max_model_len", "block_size", "max_num_seqs",
               "max_num_batched_tokens", "enable_prefix_caching", "enable_chunked_prefill", "async_scheduling",
               "kv_cache_memory", "num_kv_blocks", "scheduling_policy", "device", "seed", "worker_threads",
               "bind_cores", "engine_secret", "step_timeout")


def parse_size(text: str) -> int:
    """Bytes from '2GiB', '512MiB', '1.5G' or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"expected a size such as 2GiB, 512MiB or 1073741824, got {text!r}")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="local Hugging Face model directory, or a hub id to download")
    parser.add_argument("--log-level", type=str.lower, default=os.environ.get("CONVEYOR_LOG_LEVEL"),
                        choices=["debug", "info", "warning", "error"],
                        help="default: $CONVEYOR_LOG_LEVEL, else info for serve and warning for generate")
    g = parser.add_argument_group("engine")
    g.add_argument("--tokenizer", help="tokenizer directory or hub id (default: the model's)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="worker processes, one per rank")
    g.add_argument("--max-model-len", type=int, help="longest prompt + output (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most requests running at once")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    g.add_argument("--kv-cache-memory", type=parse_size,
                   help="KV-cache bytes per rank, e.g. 4GiB (default: 2 GiB on CPU, 85%% of free GPU memory)")
    g.add_argument("--num-kv-blocks", type=int, help="exact number of KV-cache blocks (overrides the above)")
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="do not reuse the KV cache of repeated prompt prefixes")
    g.add_argument("--no-chunked-prefill", dest="enable_chunked_prefill", action="store_false",
                   help="do not split long prompts across steps")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule the next step while the workers run the current one (default: on CUDA, "
                        "and on a CPU with cores to spare beyond the workers' threads)")
    g.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"])
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--seed", type=int, default=0, help="seed of unseeded sampling")
    g.add_argument("--worker-threads", type=int, help="torch threads per worker on a CPU (default: the usable "
                                                      "cores / tensor-parallel size)")
    g.add_argument("--no-bind-cores", dest="bind_cores", action="store_false",
                   help="on a CPU, do not bind workers and the engine core to cores of their own")
    g.add_argument("--step-timeout", type=float, default=600.0, metavar="S",
                   help="seconds a model step may take before the engine counts a worker as hung and stops, "
                        "naming it (default 600)")
    limits = parser.add_argument_group("request limits", "how much one request may ask for")
    for f in msgspec.structs.fields(RequestLimits):
        limits.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=f.default,
                            help=f"default {f.default}")


def engine_args(args: argparse.Namespace) -> dict[str, Any]:
    kwargs = {name: getattr(args, name) for name in ENGINE_ARGS if getattr(args, name, None) is not None}
    limits = {f.name: getattr(args, f.name) for f in msgspec.structs.fields(RequestLimits)
              if getattr(args, f.name, None) is not None}
    return {**kwargs, "request_limits": RequestLimits(**limits)}


def resolve_model(name: str) -> str:
    """A local directory as is; anything else is a hub id, downloaded (or found in the hub cache)."""
    if os.path.isdir(name):
        return name
    from huggingface_hub import snapshot_download

    logger.info("%s is not a local directory: fetching it from the Hugging Face hub", name)
    return snapshot_download(name, allow_patterns=DOWNLOAD_PATTERNS)


def startup_failure(command: str, exc: Exception) -> int:
    """Report why the engine did not start in one line on stderr (the traceback goes to the log
    at DEBUG); the exit status: 1 when the engine failed, 2 for bad input (arguments, model files)."""
    logger.debug("conveyor %s failed to start", command, exc_info=exc)
    from conveyor.frontend.errors import EngineStartupError
    from conveyor.ipc.process import summarize_failure

    cause = summarize_failure(str(exc))
    if not isinstance(exc, EngineStartupError | ValueError | OSError):
        cause = f"failed to start: {type(exc).__name__}: {cause}"
    print(f"conveyor {command}: {cause}", file=sys.stderr)
    return 2 if isinstance(exc, ValueError | OSError) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conveyor", description="Conveyor LLM inference engine.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{serve,generate,bench}")

    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                           description="Serve MODEL over an OpenAI-compatible HTTP API.")
    add_engine_args(serve)
    s = serve.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", help="the model name clients send (default: MODEL as given)")
    s.add_argument("--api-key", default=os.environ.get("CONVEYOR_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: "
                        "$CONVEYOR_API_KEY)")
    s.add_argument("--public-metrics", action="store_true",
                   help="with --api-key, serve /metrics without the key (for scrapers that send none)")
    s.add_argument("--max-request-body", type=parse_size, default=DEFAULT_MAX_REQUEST_BYTES, metavar="SIZE",
                   help="largest request body accepted, e.g. 16MiB (the default); larger ones get 413")
    s.add_argument("--trust-request-chat-template", action="store_true",
                   help="render a chat template that a request brings (chat_template, or chat_template_kwargs"
                        "'s); a template is code, so this is for trusted clients only (it renders under a time limit)")
    s.add_argument("--allowed-logits-processors", nargs="+", default=[], metavar="PATH",
                   help="import paths ('pkg.module:fn') that requests may name in logits_processors; "
                        "they run in the engine's processes (default: none)")
    m = serve.add_argument_group("multi-process")
    m.add_argument("--api-server-count", type=int, default=1, metavar="K",
                   help="API-server processes sharing one engine core and the HTTP port (default 1)")
    m.add_argument("--headless", action="store_true",
                   help="run only the engine core and its workers, listening for API servers on "
                        "tcp://HOST:ENGINE_PORT (--host is then the interface to listen on)")
    m.add_argument("--engine-port", type=int, default=5570, help="the --headless core's port (default 5570)")
    m.add_argument("--engine-address", metavar="HOST:PORT",
                   help="run API servers for the --headless core there (its engine arguments apply; "
                        "MODEL still names the tokenizer to load)")
    m.add_argument("--engine-secret", metavar="SECRET", default=os.environ.get("CONVEYOR_ENGINE_SECRET"),
                   help="shared by a --headless core and the API servers of --engine-address: their tcp links "
                        "then authenticate and encrypt (CurveZMQ); required beyond loopback; at least 16 "
                        "characters (default: $CONVEYOR_ENGINE_SECRET, which, unlike the command line, other "
                        "users cannot read)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGINT/SIGTERM, seconds in-flight requests get to finish before they are aborted")

    gen = sub.add_parser("generate", help="stream one generation to the terminal",
                         description="Generate from PROMPT with MODEL and stream the text to stdout.")
    add_engine_args(gen)
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--sampling-seed", type=int, help="seed of this request's sampling")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")

    bench = sub.add_parser("bench", help="run a benchmark from conveyor.tools (bench_<SUB>.py)",
                           description="Run conveyor.tools.bench_SUB.main(ARGS); `conveyor bench SUB --help` "
                                       "shows its options.")
    bench.add_argument("sub", help="latency, throughput, serving, kernels, compare, ...")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    return parser


async def generate(args: argparse.Namespace) -> int:
    from conveyor.frontend.async_llm import AsyncLLM
    from conveyor.sampling_params import RequestOutputKind, SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                            seed=args.sampling_seed, stop=args.stop, ignore_eos=args.ignore_eos,
                            output_kind=RequestOutputKind.DELTA)
    try:
        engine = AsyncLLM(args.model, **engine_args(args))
    except Exception as exc:
        return startup_failure("generate", exc)
    try:
        prompt = args.prompt
        if args.chat:
            text = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                        add_generation_prompt=True)
            prompt = {"prompt": text, "prompt_token_ids": engine.tokenizer.encode(text, add_special_tokens=False)}
        async for out in engine.generate(prompt, params):
            sys.stdout.write(out.outputs[0].text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        logger.info("finish_reason=%s", out.outputs[0].finish_reason)
    finally:
        engine.shutdown()
    return 0


def bench(sub: str, argv: list[str]) -> int:
    if not re.fullmatch(r"[a-z0-9_]+", sub):
        print(f"conveyor bench: no benchmark named {sub!r}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f"conveyor.tools.bench_{sub}")
    except ModuleNotFoundError as e:
        if e.name != f"conveyor.tools.bench_{sub}":
            raise
        print(f"conveyor bench: no benchmark named {sub!r} (no conveyor.tools.bench_{sub})", file=sys.stderr)
        return 2
    if not hasattr(module, "main"):
        print(f"conveyor bench: conveyor.tools.bench_{sub} has no main(argv)", file=sys.stderr)
        return 2
    result = module.main(argv)
    return result if isinstance(result, int) else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        return bench(args.sub, args.bench_args)
    args.log_level = args.log_level or ("info" if args.command == "serve" else "warning")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        args.served_model_name = args.served_model_name or args.model
    try:
        args.model = resolve_model(args.model)
        if args.tokenizer is not None:
            args.tokenizer = resolve_model(args.tokenizer)
    except (OSError, ValueError) as e:  # what the hub raises for a bad id, a missing repo, no network
        print(f"conveyor {args.command}: no local model directory there, nor on the Hugging Face hub: {e}",
              file=sys.stderr)
        return 2
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        print(f"conveyor {args.command}: {args.model} is not a model directory: it has no config.json",
              file=sys.stderr)
        return 2
    try:
        return asyncio.run(generate(args)) if args.command == "generate" else serve(args)
    except KeyboardInterrupt:  # Ctrl-C while the engine starts (a running server takes SIGINT itself)
        return 130


def serve(args: argparse.Namespace) -> int:
    if args.headless and (args.engine_address or args.api_server_count != 1):
        print("conveyor serve: --headless runs no API server: drop --engine-address/--api-server-count",
              file=sys.stderr)
        return 2
    if args.api_server_count < 1:
        print("conveyor serve: --api-server-count must be >= 1", file=sys.stderr)
        return 2
    from conveyor.frontend import launcher

    if args.headless:
        return launcher.run_headless(args)
    from conveyor.frontend.api_server import run_server

    address = args.engine_address
    if address is not None and "://" not in address:
        address = f"tcp://{address}"
    if args.api_server_count > 1:
        return launcher.run_api_servers(args, address)
    return run_server(args, engine_address=address)


if __name__ == "__main__":
    sys.exit(main())
