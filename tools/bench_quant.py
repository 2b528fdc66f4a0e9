"""The CPU's quantized linear layers against the bf16 GEMV and torch's float32 matmul, on the
linear layers of the reference model (SmolLM2-135M: hidden 576, 9/3 heads of 64, MLP 1536, vocab
49152), for a few rows of x (a decode step; more rows take the GEMM path).

    python -m conveyor.tools.bench_quant [--rows 1] [--threads N] [--repeats 7] [--out quant.json]

Each case is timed --repeats times (about 0.1 s of calls each) after a warm-up; the median is
reported (and the fastest wall-clock repeat), with the rate its weight bytes are read at (from the
median). Calls take turns over as many distinct weights of a shape as the model has, so the
caches hold what they would in a decode step. With --threads 1 the median is of CPU time, which other processes on a shared machine
disturb less than wall-clock time (they still share caches, memory and a hyperthread's core).
"per token" weighs each shape by its count in the model (30 layers and the lm_head): the time one
decode step spends in linear layers. On a shared machine, read the timings as rough.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from conveyor.kernels import cpu as cpu_kernels
from conveyor.kernels.quant import QuantType, quantize
from conveyor.kernels.quant_linear import quantized_linear
from conveyor.tools.bench_common import machine_info, print_table, write_json

# name: (N, K, count in the model)
SHAPES = {"q_proj/o_proj": (576, 576, 60), "k_proj/v_proj": (192, 576, 60), "gate/up_proj": (1536, 576, 60),
          "down_proj": (576, 1536, 30), "lm_head": (49152, 576, 1)}
KERNELS = ("Q4_1", "Q4_0", "Q8_0", "bf16 gemv", "torch fp32")


def seconds_per_call(fn, repeats: int) -> tuple[float, float, float]:
    """Wall-clock (median, fastest) over the repeats, and the median of the calling thread's CPU
    time, which is the whole call's on one thread and stays put while other processes take turns."""
    fn()
    start = time.perf_counter()
    fn()
    calls = max(1, int(0.1 / max(time.perf_counter() - start, 1e-7)))
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.thread_time()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
        cpu_times.append((time.thread_time() - cpu_start) / calls)
    return statistics.median(times), min(times), statistics.median(cpu_times)


def rotating(fn, weights: list):
    """A call of fn on the next of weights each time, as a model's layers take turns."""
    turn = itertools.cycle(weights)
    return lambda: fn(next(turn))


def cases(kernels, n: int, k: int, copies: int, rows: int, generator: torch.Generator):
    """(kernel name, call, weight bytes read a call) for one shape, each call on the next of
    `copies` distinct weights, so that the working set is the model's, not one cache-hot weight."""
    weight = torch.randn(copies * n, k, generator=generator) * 0.05
    x = torch.randn(rows, k, generator=generator)
    for name in KERNELS[:3]:
        qweight = quantize(weight, QuantType[name])
        yield (name, rotating(lambda q: quantized_linear(x, q), [qweight.narrow(0, i * n, n) for i in range(copies)]),
               qweight.nbytes // copies)
    w16, x16 = weight.bfloat16(), x.bfloat16()
    if rows <= kernels.gemv_max_rows:
        yield "bf16 gemv", rotating(lambda w: kernels.gemv(x16, w), list(w16.split(n))), n * k * 2
    yield "torch fp32", rotating(lambda w: torch.nn.functional.linear(x, w), list(weight.split(n))), n * k * 4


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1, help="rows of x (tokens a step)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="OpenMP threads")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated names of {list(SHAPES)}")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.rows < 1:
        parser.error(f"--rows must be at least 1, got {args.rows}")
    names = args.shapes.split(",")
    if unknown := [s for s in names if s not in SHAPES]:
        parser.error(f"unknown shapes {unknown}; known: {list(SHAPES)}")
    kernels = cpu_kernels.load()
    if kernels is None:
        raise SystemExit("the CPU kernels did not build here (is a C compiler installed?)")
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    one_thread = args.threads == 1
    results, per_token = [], dict.fromkeys(KERNELS, 0.0)
    for shape in names:
        n, k, count = SHAPES[shape]
        for kernel, call, nbytes in cases(kernels, n, k, count, args.rows, generator):
            seconds, fastest, cpu_seconds = seconds_per_call(call, args.repeats)
            if one_thread:
                seconds = cpu_seconds
            results.append({"shape": f"{shape} {n}x{k}", "kernel": kernel, "us": 1e6 * seconds,
                            "best_us": 1e6 * fastest, "weight_mb": nbytes / 1e6, "gb_per_s": nbytes / seconds / 1e9})
            per_token[kernel] += count * seconds
    info = machine_info()
    print(f"{info['cpu']}, {args.threads} threads, {args.rows} row(s) of x; us/call: median "
          f"{'CPU time' if one_thread else 'wall-clock time'}, best us: fastest wall-clock repeat")
    print_table(results, [("shape", "shape"), ("kernel", "kernel"), ("us", "us/call"), ("best_us", "best us"),
                          ("weight_mb", "weight MB"), ("gb_per_s", "GB/s")])
    if set(names) == set(SHAPES):
        print("per token, all linear layers: " + ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in per_token.items() if v))
    write_json(args.out, {"machine": info, "args": vars(args), "results": results,
                          "per_token_ms": {k: 1e3 * v for k, v in per_token.items() if v}})


if __name__ == "__main__":
    main()
