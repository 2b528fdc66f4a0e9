"""Offline throughput: N prompts at once, every request generating exactly --output-len tokens.

    python -m conveyor.tools.bench_throughput --backend conveyor --model DIR \\
        --num-prompts 64 --input-len 128 --output-len 128 --repeats 3 --out bench_results/tp.json

Each backend runs in its own process (tools/bench_runner.py); prompts are random token ids from a
fixed seed, or --dataset (JSON lines). Every timed run gets prompts no earlier run has seen, so
prefix caches never serve a repeat. Reports medians over --repeats, start-up time and the peak
memory of the backend's whole process tree. `--backend llamacpp` (a .gguf --model) runs the batch's
prompts one after another: llama-cpp-python's API decodes one sequence at a time.
"""

import argparse
import sys

from conveyor.tools import bench_common as bc

COLUMNS = [("backend", "backend"), ("dtype", "dtype"), ("requests_per_s", "req/s"), ("input_tok_per_s", "in tok/s"),
           ("output_tok_per_s", "out tok/s"), ("elapsed_s", "wall s"), ("startup_s", "startup s"),
           ("peak_rss_mib", "peak RSS MiB"), ("peak_pss_mib", "peak PSS MiB")]


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens (random prompts)")
    parser.add_argument("--output-len", type=int, default=128, help="tokens generated per request")
    parser.add_argument("--dataset", help="JSON lines of {'prompt': ...} or {'prompt_token_ids': [...]}")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of the same shape first")


def throughput_workload(args: argparse.Namespace, backend: str) -> dict:
    vocab = bc.model_vocab_size(args.model)
    runs = args.warmup + args.repeats
    if args.dataset:
        base = bc.load_dataset(args.dataset, args.model, args.num_prompts)
        batches = [bc.salted(base, vocab, args.seed + i) for i in range(runs)]
    else:
        batches = [bc.random_prompts(args.num_prompts, args.input_len, vocab, args.seed + i) for i in range(runs)]
    return {"backend": backend, "mode": "throughput", "model": args.model, "dtype": args.dtype,
            "engine_args": bc.engine_args(args), "kv_cache_gib": args.kv_cache_gib or None,
            "output_len": args.output_len,
            "warmup": [p for batch in batches[:args.warmup] for p in batch], "runs": batches[args.warmup:]}


def summarize_throughput(result: dict) -> dict:
    runs = result["runs"]
    row = {"backend": result["backend"], "dtype": result.get("dtype"), "startup_s": result["startup_s"],
           "peak_rss_mib": result.get("peak_rss_mib"), "peak_pss_mib": result.get("peak_pss_mib")}
    for key in ("requests_per_s", "input_tok_per_s", "output_tok_per_s", "total_tok_per_s", "elapsed_s"):
        row[key] = bc.median([r[key] for r in runs])
    return row


def run_throughput(args: argparse.Namespace, backend: str) -> dict:
    return bc.run_one(args, backend, throughput_workload, summarize_throughput)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=bc.BACKEND_NAMES, default="conveyor")
    bc.add_engine_args(parser)
    add_workload_args(parser)
    args = parser.parse_args(argv)
    try:
        result = run_throughput(args, args.backend)
    except bc.BenchError as e:
        sys.exit(f"error: {e}")
    bc.report_one(args, "throughput", result, COLUMNS)

if __name__ == "__main__":
    main()
