"""Side by side: throughput and batch-1 latency of several backends on one workload, one backend
after another (never at once), each in its own processes.

    python -m conveyor.tools.bench_compare --backends conveyor,hf,vllm --model DIR \\
        --num-prompts 64 --input-len 128 --output-len 128 [--serving] --out bench_results/compare.json

`--serving` also starts each backend's OpenAI server (transformers has none) and loads it with the
same prompts, as bench_serving does: Poisson arrivals at --request-rate, --max-concurrency at most.
The servers get the same engine limits (--max-num-seqs, ...) and vLLM environment as the offline runs.

Backends: conveyor, hf (transformers generate), vllm (tuned: tcmalloc, OpenMP bound to every
core), vllm-default (vLLM's CPU defaults) and llamacpp (llama-cpp-python on the same GGUF file,
which --model must then be, with as many threads as Conveyor's worker; its API runs one sequence
at a time, so its throughput batch runs its prompts one after another, and it has no serving run).
Each but llamacpp optionally takes a dtype of its own (`conveyor,conveyor:float32,vllm:bfloat16`;
otherwise --dtype; llamacpp computes in the file's own types). A vLLM or llama.cpp backend is
skipped, with a note, when its virtualenv is missing (tools/setup_vllm_cpu.sh,
tools/setup_llama_cpp.sh). Ratios are each backend's number
divided by the reference backend's (the first conveyor that ran). The table shows the dtype each
engine chose.

`--emulate-avx2` runs every backend as on a CPU with AVX2 and no AVX-512 (AVX2_LIMITS in
bench_common: torch, oneDNN and Conveyor's C kernels limited to AVX2; vLLM's own C++ kernels keep
whatever they dispatch to).
"""

import argparse
import os
import sys

from conveyor.tools import bench_common as bc
from conveyor.tools.bench_latency import run_latency
from conveyor.tools.bench_serving import run_serving, summarize
from conveyor.tools.bench_throughput import add_workload_args, run_throughput

CHOICES = ("conveyor", "hf", "llamacpp", "vllm", "vllm-default")
DTYPES = ("auto", "bfloat16", "float16", "float32")
COLUMNS = [("backend", "backend"), ("dtype", "dtype"), ("output_tok_per_s", "out tok/s"), ("requests_per_s", "req/s"),
           ("ttft_ms_p50", "TTFT p50 ms"), ("tpot_ms_p50", "TPOT p50 ms"), ("startup_s", "startup s"),
           ("peak_rss_mib", "peak RSS MiB"), ("peak_pss_mib", "peak PSS MiB")]
RATIO_KEYS = ("output_tok_per_s", "ttft_ms_p50", "tpot_ms_p50", "peak_pss_mib")
SERVING_COLUMNS = [("backend", "backend"), ("output_tok_per_s", "out tok/s"), ("ttft_ms_p50", "TTFT p50 ms"),
                   ("ttft_ms_p90", "TTFT p90 ms"), ("tpot_ms_p50", "TPOT p50 ms"), ("itl_ms_p50", "ITL p50 ms"),
                   ("itl_ms_p99", "ITL p99 ms"), ("server_startup_s", "startup s")]
SERVING_RATIO_KEYS = ("output_tok_per_s", "ttft_ms_p50", "tpot_ms_p50", "itl_ms_p99")


def parse_backends(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name.partition(":")[0] not in CHOICES
               or name.partition(":")[1] and (name.partition(":")[2] not in DTYPES or name.startswith("llamacpp:"))]
    if unknown or not names:
        raise ValueError(f"backends must be a comma-separated list of {', '.join(CHOICES)}, each optionally "
                         f"with :{'|'.join(DTYPES)} (llamacpp: none, the GGUF file's types), got {text!r}")
    return names


def backend_args(args: argparse.Namespace, name: str, **overrides) -> tuple[argparse.Namespace, str]:
    """(args for one backend's run, the runner backend it uses)."""
    kind, _, dtype = name.partition(":")
    vllm_config = "default" if kind == "vllm-default" else args.vllm_config
    return (argparse.Namespace(**{**vars(args), "vllm_config": vllm_config, "dtype": dtype or args.dtype, **overrides}),
            kind.split("-")[0])


def run_one(args: argparse.Namespace, name: str) -> dict:
    row, detail = {"backend": name}, {}
    if args.throughput:
        tp_args, backend = backend_args(args, name)
        detail["throughput"] = run_throughput(tp_args, backend)
        summary = detail["throughput"]["summary"]
        row.update({k: summary[k] for k in ("dtype", "output_tok_per_s", "requests_per_s", "input_tok_per_s",
                                            "elapsed_s", "startup_s", "peak_rss_mib", "peak_pss_mib")})
    if args.latency:
        lat_args, backend = backend_args(args, name, repeats=args.latency_repeats, warmup=args.latency_warmup)
        detail["latency"] = run_latency(lat_args, backend)
        summary = detail["latency"]["summary"]
        row.setdefault("dtype", summary["dtype"])
        row.update({k: summary[k] for k in ("ttft_ms_p50", "ttft_ms_p90", "tpot_ms_p50", "tpot_ms_p90", "e2e_s_p50")})
        row.setdefault("startup_s", summary["startup_s"])
        row.setdefault("peak_rss_mib", summary["peak_rss_mib"])
    return {"row": row, "detail": detail}


def serve_one(args: argparse.Namespace, name: str) -> dict:
    """One backend's server under the serving load: its summary row (bench_serving's numbers)."""
    serving_args, backend = backend_args(args, name, backend=name.partition(":")[0].split("-")[0], base_url=None, model_dir=args.model,
                                         served_model_name=None, startup_timeout=args.timeout, request_timeout=600.0,
                                         arrival="poisson")
    results, duration = run_serving(serving_args)
    summary, _ = summarize(results, duration)
    if summary["completed"] == 0:
        raise bc.BenchError("no request completed")
    return {"backend": name, "server_startup_s": serving_args.server_startup_s, **summary}


def ratio_rows(rows: list[dict], reference: dict, keys=RATIO_KEYS) -> list[dict]:
    out = []
    for row in rows:
        ratios = {"backend": row["backend"]}
        for key in keys:
            mine, theirs = row.get(key), reference.get(key)
            ratios[key] = mine / theirs if mine is not None and theirs else None
        out.append(ratios)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="conveyor,hf,vllm", help=f"comma-separated: {', '.join(CHOICES)}")
    bc.add_engine_args(parser)
    add_workload_args(parser)
    parser.add_argument("--latency-repeats", type=int, default=10, help="timed batch-1 requests")
    parser.add_argument("--latency-warmup", type=int, default=2)
    parser.add_argument("--no-throughput", dest="throughput", action="store_false")
    parser.add_argument("--no-latency", dest="latency", action="store_false")
    parser.add_argument("--serving", action="store_true", help="also load each backend's OpenAI server")
    parser.add_argument("--emulate-avx2", action="store_true",
                        help="run every backend as on an AVX2 CPU without AVX-512 (torch, oneDNN, C kernels limited)")
    parser.add_argument("--request-rate", type=float, default=4.0, help="with --serving: requests/s")
    parser.add_argument("--max-concurrency", type=int, default=16, help="with --serving: requests in flight")
    args = parser.parse_args(argv)
    try:
        names = parse_backends(args.backends)
    except ValueError as e:
        parser.error(str(e))

    if args.emulate_avx2:
        os.environ.update(bc.AVX2_LIMITS)  # every backend's processes inherit them
    machine = bc.machine_info()
    bc.print_machine(machine)
    rows, serving_rows, details, notes = [], [], {}, []
    for name in names:
        if name.startswith("vllm") and not bc.vllm_available(args.vllm_venv):
            notes.append(f"{name}: skipped, no vLLM virtualenv at {args.vllm_venv} (tools/setup_vllm_cpu.sh)")
            continue
        if name == "llamacpp" and not bc.llamacpp_available(args.llamacpp_venv):
            notes.append(f"{name}: skipped, no llama.cpp virtualenv at {args.llamacpp_venv} (tools/setup_llama_cpp.sh)")
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        try:
            result = run_one(args, name)
        except bc.BenchError as e:
            notes.append(f"{name}: failed: {e}")
            continue
        rows.append(result["row"])
        details[name] = result["detail"]
        if args.serving and name == "hf":
            notes.append("hf: no serving run (transformers has no server)")
        elif args.serving and name == "llamacpp":
            notes.append("llamacpp: no serving run (llama-cpp-python's server runs one request at a time)")
        elif args.serving:
            try:
                serving_rows.append(serve_one(args, name))
            except (bc.BenchError, OSError, RuntimeError, ValueError) as e:
                notes.append(f"{name}: serving failed: {e}")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if not rows:
        sys.exit("error: no backend ran")

    reference = next((row for row in rows if row["backend"].startswith("conveyor")), rows[0])
    ratios = ratio_rows(rows, reference)
    if args.throughput or args.latency:
        bc.print_table(rows, COLUMNS)
        print(f"\nratio to {reference['backend']} (throughput: higher is faster; latency, memory: higher is more)")
        bc.print_table(ratios, [("backend", "backend"), ("output_tok_per_s", "out tok/s ×"),
                                ("ttft_ms_p50", "TTFT ×"), ("tpot_ms_p50", "TPOT ×"), ("peak_pss_mib", "PSS ×")])
    serving_ratios = []
    if serving_rows:
        serving_reference = next((r for r in serving_rows if r["backend"].startswith("conveyor")), serving_rows[0])
        serving_ratios = ratio_rows(serving_rows, serving_reference, SERVING_RATIO_KEYS)
        print(f"\nserving: {args.num_prompts} requests, Poisson at {args.request_rate:g}/s, "
              f"at most {args.max_concurrency} in flight")
        bc.print_table(serving_rows, SERVING_COLUMNS)
        print(f"\nratio to {serving_reference['backend']}")
        bc.print_table(serving_ratios, [("backend", "backend"), ("output_tok_per_s", "out tok/s ×"),
                                        ("ttft_ms_p50", "TTFT ×"), ("tpot_ms_p50", "TPOT ×"),
                                        ("itl_ms_p99", "ITL p99 ×")])
    bc.print_machine(machine)
    bc.write_json(args.out, {"benchmark": "compare", "machine": machine, "args": vars(args),
                             "reference": reference["backend"], "rows": rows, "ratios": ratios,
                             "serving": serving_rows, "serving_ratios": serving_ratios, "notes": notes,
                             "details": details})


if __name__ == "__main__":
    main()
