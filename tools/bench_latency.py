"""Batch-1 latency: one request at a time, streamed, its tokens time-stamped as they arrive.

    python -m conveyor.tools.bench_latency --backend conveyor --model DIR \\
        --input-len 128 --output-len 128 --repeats 10 --out bench_results/latency.json

TTFT is the time from submitting the request to its first token; TPOT the mean time per later
token, (last - first) / (n - 1). Conveyor and vLLM stream through their AsyncLLM (delta outputs),
transformers through a `streamer` passed to generate(), llama.cpp (`--backend llamacpp`, a .gguf
--model, Conveyor's worker thread count) through llama-cpp-python's token generator. Every request
has a prompt of its own. `--prompt-repeats R` makes each prompt a random text repeated R times, a
workload that n-gram speculative decoding (`--speculative-config`) can draft from; Conveyor's rows
then report the drafts' acceptance rate.
"""

import argparse
import sys

from conveyor.tools import bench_common as bc

COLUMNS = [("backend", "backend"), ("dtype", "dtype"), ("ttft_ms_p50", "TTFT p50 ms"), ("ttft_ms_p90", "TTFT p90 ms"),
           ("tpot_ms_p50", "TPOT p50 ms"), ("tpot_ms_p90", "TPOT p90 ms"), ("e2e_s_p50", "E2E p50 s"),
           ("max_itl_ms_p50", "max ITL p50 ms"), ("acceptance_rate", "drafts kept"), ("startup_s", "startup s"),
           ("peak_rss_mib", "peak RSS MiB")]


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10, help="timed requests, one after another")
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests first")
    parser.add_argument("--prompt-repeats", type=int, default=1, metavar="R",
                        help="each prompt a random text of input-len / R tokens, repeated R times (default 1)")


def latency_workload(args: argparse.Namespace, backend: str) -> dict:
    vocab = bc.model_vocab_size(args.model)
    # a seed apart from the throughput prompts', so a shared prefix cache could not help either
    repeats = max(1, getattr(args, "prompt_repeats", 1))
    texts = bc.random_prompts(args.warmup + args.repeats, -(-args.input_len // repeats), vocab, args.seed + 1_000_003)
    prompts = [(text * repeats)[:args.input_len] for text in texts]
    return {"backend": backend, "mode": "latency", "model": args.model, "dtype": args.dtype,
            "engine_args": bc.engine_args(args), "kv_cache_gib": args.kv_cache_gib or None,
            "output_len": args.output_len,
            "warmup": prompts[:args.warmup], "runs": prompts[args.warmup:]}


def summarize_latency(result: dict) -> dict:
    runs = result["runs"]
    row = {"backend": result["backend"], "dtype": result.get("dtype"), "startup_s": result["startup_s"],
           "peak_rss_mib": result.get("peak_rss_mib")}
    for key, scale, name in (("ttft_s", 1e3, "ttft_ms"), ("tpot_s", 1e3, "tpot_ms"), ("e2e_s", 1, "e2e_s"),
                             ("max_itl_s", 1e3, "max_itl_ms")):
        values = [r[key] * scale for r in runs]
        row[f"{name}_p50"], row[f"{name}_p90"] = bc.percentile(values, 50), bc.percentile(values, 90)
        row[f"{name}_mean"] = sum(values) / len(values)
    if result.get("num_draft_tokens"):
        row["acceptance_rate"] = result["num_accepted_tokens"] / result["num_draft_tokens"]
    return row


def run_latency(args: argparse.Namespace, backend: str) -> dict:
    return bc.run_one(args, backend, latency_workload, summarize_latency)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=bc.BACKEND_NAMES, default="conveyor")
    bc.add_engine_args(parser)
    add_workload_args(parser)
    args = parser.parse_args(argv)
    try:
        result = run_latency(args, args.backend)
    except bc.BenchError as e:
        sys.exit(f"error: {e}")
    bc.report_one(args, "latency", result, COLUMNS)

if __name__ == "__main__":
    main()
