"""Engine overhead: steps/s and the share of each step spent outside the model forward.

A 1-layer tiny model makes the forward cheap, so what remains is the engine's own cost:
scheduling, IPC, output handling. Numbers come from the core's own timers (`get_stats`): a step's
time runs from its scheduling (or the previous step's end, if later) to the end of applying its
result, and the forward is the worker's whole `execute_model`. The table gives that cost both as
a share of the step and in microseconds a step. `--model` measures a real checkpoint instead, to
see the share a user's steps pay. The default lengths are the reference workload's (128 prompt
tokens, 128 generated): shorter runs weigh each round's ramp-up and drain more.

Both scheduling modes run, whatever the engine's default here: `async` overlaps the core's work
with the worker's, `sync` does not. On a CPU the worker's OpenMP threads compete with the frontend
and the core for cores, so each mode also runs with the worker on every core and on all but one
(`--worker-threads`): the first measures that contention as much as the engine, the second what
the engine costs when it has a core to itself, as it has beside a GPU.

    python -m conveyor.tools.bench_overhead [--batch-sizes 1,64,256] [--scheduling async,sync]
        [--worker-threads N,M] [--repeats 3] [--model DIR --dtype bfloat16] [--out overhead.json]
"""

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time

from conveyor import AsyncLLM, SamplingParams
from conveyor.tools.make_tiny_model import make_tiny_model


async def measure(llm: AsyncLLM, batch: int, output_len: int, prompt_len: int) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, detokenize=False)

    async def one(i: int):
        async for _ in llm.generate({"prompt_token_ids": [3 + (i + j) % 200 for j in range(prompt_len)]}, params):
            pass

    before = await llm.get_stats()
    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(batch)))
    wall = time.perf_counter() - start
    after = await llm.get_stats()
    steps = after["num_steps"] - before["num_steps"]
    step_time = after["total_step_time"] - before["total_step_time"]
    model_time = after["total_model_time"] - before["total_model_time"]
    return {
        "batch_size": batch,
        "steps": steps,
        "steps_per_s": steps / step_time,
        "mean_step_ms": 1000 * step_time / steps,
        "overhead_share": 1 - model_time / step_time,
        "overhead_us_per_step": 1e6 * (step_time - model_time) / steps,
        "output_tok_per_s": batch * output_len / wall,
    }


async def run(args) -> list[dict]:
    """Each configuration (scheduling mode, worker threads) in its own engine, rounds alternating
    between them (this machine's speed drifts); medians per configuration and batch size."""
    rounds: dict[tuple[str, int, int], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_tiny_model(f"{tmp}/one-layer", "llama", num_layers=1)
        max_batch = max(args.batch_sizes)
        for _ in range(args.repeats):
            for mode in args.scheduling:
                for threads in args.worker_threads:
                    async with AsyncLLM(str(model), dtype=args.dtype, max_num_seqs=max_batch,
                                        max_num_batched_tokens=max(2048, max_batch * args.prompt_len),
                                        async_scheduling=mode == "async", worker_threads=threads) as llm:
                        await measure(llm, 4, 8, args.prompt_len)  # warm-up
                        for b in args.batch_sizes:
                            rounds.setdefault((mode, threads, b), []).append(
                                await measure(llm, b, args.output_len, args.prompt_len))
    rows = []
    for (mode, threads, batch), results in rounds.items():
        row = {"model": args.model or "1-layer tiny", "dtype": args.dtype, "scheduling": mode,
               "worker_threads": threads, "batch_size": batch, "repeats": len(results)}
        for key in ("steps_per_s", "mean_step_ms", "overhead_share", "overhead_us_per_step", "output_tok_per_s"):
            row[key] = statistics.median(r[key] for r in results)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 64, 256])
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--scheduling", type=parse_modes, default=["async", "sync"],
                        help="comma-separated: async (the default engine), sync (--no-async-scheduling)")
    cores = os.cpu_count() or 1
    parser.add_argument("--worker-threads", type=parse_counts, default=sorted({max(1, cores - 1), cores}),
                        help="comma-separated torch thread counts for the worker (default: all cores, "
                             "and all but one)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the modes; medians reported")
    parser.add_argument("--model", help="a checkpoint to measure instead of the 1-layer tiny model")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    rows = asyncio.run(run(args))
    print(f"{'scheduling':>10} {'threads':>7} {'batch':>6} {'steps/s':>9} {'step ms':>8} {'outside forward':>16} "
          f"{'us/step':>8} {'out tok/s':>10}")
    for r in rows:
        print(f"{r['scheduling']:>10} {r['worker_threads']:>7} {r['batch_size']:>6} {r['steps_per_s']:>9.1f} "
              f"{r['mean_step_ms']:>8.2f} "
              f"{100 * r['overhead_share']:>15.1f}% {r['overhead_us_per_step']:>8.0f} {r['output_tok_per_s']:>10.0f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


def parse_modes(text: str) -> list[str]:
    modes = text.split(",")
    for mode in modes:
        if mode not in ("async", "sync"):
            raise argparse.ArgumentTypeError(f"scheduling modes are async and sync, got {mode!r}")
    return modes


def parse_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"worker threads must be positive integers, got {text!r}")
    return counts


if __name__ == "__main__":
    main()
