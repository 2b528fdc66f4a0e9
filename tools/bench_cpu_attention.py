"""Decode attention of the CPU C kernel alone: one layer's call for a batch of decodes, each over a
context of the given length, read from a paged cache whose blocks are shuffled (as a busy engine's
are). Reports microseconds a call and the rate the keys and values are read at (each once), the
figure to hold against the machine's memory bandwidth once the cache outgrows the CPU's caches.

    python -m conveyor.tools.bench_cpu_attention [--shapes 64x255,64x1023,16x4095] [--heads 9]
        [--kv-heads 3] [--head-dim 64] [--dtype bfloat16] [--threads N] [--out attention.json]

The defaults are the reference model's attention (SmolLM2-135M: 9 query heads, 3 KV heads, head
dim 64, bfloat16). Each shape is timed --repeats times after a warm-up; the median is reported.
"""

import argparse
import json
import statistics
import time

import torch

from conveyor.kernels import cpu as cpu_kernels


def parse_shapes(text: str) -> list[tuple[int, int]]:
    try:
        shapes = [tuple(int(x) for x in part.split("x")) for part in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"shapes are BATCHxCONTEXT,..., e.g. 64x255, got {text!r}")
    return shapes


def time_shape(kernels, batch: int, context: int, args, generator: torch.Generator) -> dict:
    dtype = getattr(torch, args.dtype)
    block_size = args.block_size
    blocks_per_seq = context // block_size + 1
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, block_size, args.kv_heads, args.head_dim)
    k_cache = torch.randn(shape, generator=generator).to(dtype)
    v_cache = torch.randn(shape, generator=generator).to(dtype)
    tables = torch.randperm(num_blocks, generator=generator).view(batch, blocks_per_seq).to(torch.int32)
    seq_lens = torch.full((batch,), context, dtype=torch.int32)
    query_start_loc = torch.arange(batch + 1, dtype=torch.int32)
    q = torch.randn(batch, args.heads, args.head_dim, generator=generator).to(dtype)
    out = torch.empty_like(q)
    scale = args.head_dim ** -0.5

    def call():
        kernels.paged_attention(q, k_cache, v_cache, out, tables, seq_lens, query_start_loc, scale, None)

    call()
    # enough calls a repeat for about 0.2 s
    start = time.perf_counter()
    call()
    calls = max(1, int(0.2 / max(time.perf_counter() - start, 1e-6)))
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        times.append((time.perf_counter() - start) / calls)
    seconds = statistics.median(times)
    kv_bytes = 2 * batch * context * args.kv_heads * args.head_dim * k_cache.element_size()
    return {"batch": batch, "context": context, "us_per_call": 1e6 * seconds, "kv_mib": kv_bytes / 2**20,
            "kv_gb_per_s": kv_bytes / seconds / 1e9}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=parse_shapes, default=parse_shapes("64x255,64x1023,16x4095"),
                        help="comma-separated BATCHxCONTEXT (decodes, context tokens each)")
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="OpenMP threads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.heads % args.kv_heads:
        parser.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    kernels = cpu_kernels.load()
    if kernels is None:
        raise SystemExit("the CPU kernels did not build here (is a C compiler installed?)")
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    rows = [time_shape(kernels, batch, context, args, generator) for batch, context in args.shapes]
    print(f"heads {args.heads}/{args.kv_heads}, head dim {args.head_dim}, {args.dtype}, {args.threads} threads")
    print(f"{'batch':>6} {'context':>8} {'us/call':>9} {'KV MiB':>8} {'KV GB/s':>8}")
    for r in rows:
        print(f"{r['batch']:>6} {r['context']:>8} {r['us_per_call']:>9.0f} {r['kv_mib']:>8.1f} {r['kv_gb_per_s']:>8.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "shapes"}, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
