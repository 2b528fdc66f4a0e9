"""Frontend stalls: how long the caller's event loop and its streams go unserved while the engine runs.

A 1 ms ticker task shares the event loop with the streams; each stall is how late a tick came.
Each stream also records its longest gap between two outputs. Both grow when the frontend's
threads cannot get a core, which on a small CPU is mostly the workers' OpenMP threads spinning
between steps. `--spin-counts` runs each `GOMP_SPINCOUNT` given (libgomp's own default is
300000; the engine sets 10000 unless told otherwise) in its own engine, rounds alternating.

The default workload is the one that shows it most: one long request on the 2-layer tiny model,
which makes about 2,000 tokens a second for the frontend to turn into outputs.

    python -m conveyor.tools.bench_stalls [--spin-counts 300000,10000] [--concurrency 1]
        [--output-len 2000] [--repeats 8] [--model DIR --dtype bfloat16] [--out stalls.json]
"""

import argparse
import asyncio
import os
import statistics
import tempfile
import time

from conveyor import AsyncLLM, SamplingParams
from conveyor.tools.bench_common import machine_info, print_table, write_json
from conveyor.tools.make_tiny_model import make_tiny_model

STALL_MS = 50  # a tick later than this counts as a stall


async def measure(llm: AsyncLLM, concurrency: int, output_len: int) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    lags: list[float] = []
    done = asyncio.Event()

    async def ticker():
        while not done.is_set():
            start = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - start - 0.001)

    async def stream(i: int) -> float:
        longest, last = 0.0, None
        async for _ in llm.generate(f"Tell me everything about the number {i}", params):
            now = time.perf_counter()
            if last is not None:
                longest = max(longest, now - last)
            last = now
        return longest

    tick = asyncio.create_task(ticker())
    start = time.perf_counter()
    gaps = await asyncio.gather(*(stream(i) for i in range(concurrency)))
    wall = time.perf_counter() - start
    done.set()
    await tick
    lags.sort()
    return {
        "wall_s": wall,
        "output_tok_per_s": concurrency * output_len / wall,
        "max_lag_ms": 1000 * lags[-1],
        "p99_lag_ms": 1000 * lags[int(0.99 * (len(lags) - 1))],
        "max_gap_ms": 1000 * max(gaps),
    }


async def run(args) -> list[dict]:
    rounds: dict[str, list[dict]] = {count: [] for count in args.spin_counts}
    saved = os.environ.get("GOMP_SPINCOUNT")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model = args.model or make_tiny_model(f"{tmp}/tiny", "llama")
            for _ in range(args.repeats):
                for count in args.spin_counts:
                    os.environ["GOMP_SPINCOUNT"] = count  # the workers inherit it
                    async with AsyncLLM(str(model), dtype=args.dtype) as llm:
                        await measure(llm, 1, 8)  # warm-up
                        rounds[count].append(await measure(llm, args.concurrency, args.output_len))
    finally:
        if saved is None:
            os.environ.pop("GOMP_SPINCOUNT", None)
        else:
            os.environ["GOMP_SPINCOUNT"] = saved
    rows = []
    for count, results in rounds.items():
        rows.append({
            "model": args.model or "2-layer tiny", "dtype": args.dtype, "gomp_spincount": int(count),
            "concurrency": args.concurrency, "output_len": args.output_len, "repeats": len(results),
            "median_wall_s": statistics.median(r["wall_s"] for r in results),
            "median_output_tok_per_s": statistics.median(r["output_tok_per_s"] for r in results),
            "max_lag_ms": max(r["max_lag_ms"] for r in results),
            "median_p99_lag_ms": statistics.median(r["p99_lag_ms"] for r in results),
            "max_gap_ms": max(r["max_gap_ms"] for r in results),
            "rounds_with_stall": sum(r["max_lag_ms"] > STALL_MS for r in results),
            "rounds": results,
        })
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spin-counts", type=parse_counts, default=["300000", "10000"],
                        help="comma-separated GOMP_SPINCOUNT values for the workers")
    parser.add_argument("--concurrency", type=int, default=1, help="requests streaming at once")
    parser.add_argument("--output-len", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=8, help="rounds over the spin counts")
    parser.add_argument("--model", help="a checkpoint to run instead of the 2-layer tiny model")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    rows = asyncio.run(run(args))
    print_table(rows, [("gomp_spincount", "spin count"), ("repeats", "rounds"), ("median_wall_s", "wall s"),
                       ("median_output_tok_per_s", "out tok/s"), ("max_lag_ms", "max lag ms"),
                       ("median_p99_lag_ms", "p99 lag ms"), ("max_gap_ms", "max gap ms"),
                       ("rounds_with_stall", f"stalls > {STALL_MS} ms")])
    write_json(args.out, {"machine": machine_info(), "rows": rows})


def parse_counts(text: str) -> list[str]:
    counts = text.split(",")
    if not all(count.isdigit() for count in counts):
        raise argparse.ArgumentTypeError(f"spin counts must be non-negative integers, got {text!r}")
    return counts


if __name__ == "__main__":
    main()
