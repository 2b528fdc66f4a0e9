"""Time each Triton kernel of `conveyor.kernels` against its torch reference on a CUDA device.

    python -m conveyor.tools.bench_kernels [--dtype bfloat16] [--out results.json]
    python -m conveyor.tools.bench_kernels --compile-check      # no GPU needed

Each case first checks the kernel's output against the reference (max abs error is reported), then
times both with `triton.testing.do_bench`. Bandwidth is bytes that must move (inputs read once,
outputs written once) over the kernel's time, also as a fraction of the device's measured copy
bandwidth (a 1 GiB device-to-device copy). On a machine without CUDA it says so and exits 0.

`--compile-check` compiles every kernel ahead of time for an sm_90 (H100) target with the ptxas
bundled in Triton, so a CPU-only machine can still catch code that only the GPU compiler rejects.
Run it without TRITON_INTERPRET set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch


@dataclass(slots=True)
class Result:
    name: str
    triton_ms: float
    torch_ms: float
    gbytes: float
    max_abs_err: float

    @property
    def gbps(self) -> float:
        return self.gbytes / (self.triton_ms * 1e-3)


def copy_bandwidth_gbps(device: torch.device) -> float:
    from triton.testing import do_bench

    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() / 1e9 / (ms * 1e-3)


def bench_case(name: str, kernel: Callable[[], torch.Tensor], reference: Callable[[], torch.Tensor],
               gbytes: float) -> Result:
    from triton.testing import do_bench

    got, want = kernel().float(), reference().float()
    err = torch.where(got == want, 0.0, (got - want).abs()).max().item()  # equal infinities count as exact
    return Result(name, do_bench(kernel), do_bench(reference), gbytes, err)


def paged_batch(q_lens: list[int], contexts: list[int], heads: int, kv_heads: int, head_dim: int, block_size: int,
                dtype: torch.dtype, device: torch.device):
    seq_lens = [c + q for c, q in zip(contexts, q_lens)]
    blocks = [-(-s // block_size) for s in seq_lens]
    k_cache = torch.randn(sum(blocks), block_size, kv_heads, head_dim, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    block_tables = torch.zeros(len(q_lens), max(blocks), dtype=torch.int32)
    ids = torch.randperm(sum(blocks)).int()
    for b, n in enumerate(blocks):
        block_tables[b, :n], ids = ids[:n], ids[n:]
    q = torch.randn(sum(q_lens), heads, head_dim, dtype=dtype, device=device)
    meta = dict(
        query_start_loc=torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device), block_tables=block_tables.to(device),
        scale=head_dim**-0.5, max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        num_decodes=sum(q == 1 for q in q_lens),
    )
    kv_bytes = 2 * sum(seq_lens) * kv_heads * head_dim * k_cache.element_size()
    return q, k_cache, v_cache, meta, (kv_bytes + 2 * q.numel() * q.element_size()) / 1e9


def run_benchmarks(dtype: torch.dtype, device: torch.device) -> list[Result]:
    return bench_attention(dtype, device) + bench_elementwise(dtype, device) + bench_penalties(device)


def bench_attention(dtype: torch.dtype, device: torch.device) -> list[Result]:
    from conveyor.kernels import attention, kv_store

    es = torch.tensor([], dtype=dtype).element_size()
    results = []
    for label, q_lens, contexts in [
        ("decode 64 x 2k", [1] * 64, [2047] * 64),
        ("decode 2 x 32k (split-KV)", [1] * 2, [32767] * 2),
        ("prefill 4 x 2k", [2048] * 4, [0] * 4),
        ("mixed 32 decodes + chunk 512 @ 1.5k", [1] * 32 + [512], [2047] * 32 + [1536]),
    ]:
        q, kc, vc, meta, gb = paged_batch(q_lens, contexts, 32, 8, 128, 16, dtype, device)
        out, ref_out = torch.empty_like(q), torch.empty_like(q)
        results.append(bench_case(
            f"paged_attention {label}",
            lambda: attention.paged_attention(q, kc, vc, out, **meta),
            lambda: attention.paged_attention_ref(q, kc, vc, ref_out, **meta), gb,
        ))

    tokens, kv_heads, head_dim = 4096, 8, 128
    key = torch.randn(tokens, kv_heads, head_dim, dtype=dtype, device=device)
    value = torch.randn_like(key)
    kc = torch.zeros(tokens // 16 + 1, 16, kv_heads, head_dim, dtype=dtype, device=device)
    vc, kc_ref, vc_ref = torch.zeros_like(kc), torch.zeros_like(kc), torch.zeros_like(kc)
    slots = torch.randperm(kc.shape[0] * 16, device=device)[:tokens]
    results.append(bench_case(
        "store_kv 4096 tok x 8 x 128",
        lambda: (kv_store.store_kv(key, value, kc, vc, slots), kc)[1],
        lambda: (kv_store.store_kv_ref(key, value, kc_ref, vc_ref, slots), kc_ref)[1],
        4 * key.numel() * es / 1e9,
    ))
    return results


def bench_elementwise(dtype: torch.dtype, device: torch.device) -> list[Result]:
    from conveyor.kernels import activation, rmsnorm, rotary

    es = torch.tensor([], dtype=dtype).element_size()
    results = []
    tokens, hidden = 4096, 4096
    x = torch.randn(tokens, hidden, dtype=dtype, device=device)
    residual = torch.randn_like(x)
    weight = torch.ones(hidden, dtype=dtype, device=device)
    results.append(bench_case("rms_norm 4096 x 4096", lambda: rmsnorm.rms_norm(x, weight, 1e-6),
                              lambda: rmsnorm.rms_norm_ref(x, weight, 1e-6), 2 * x.numel() * es / 1e9))
    x2, r2, x3, r3 = x.clone(), residual.clone(), x.clone(), residual.clone()
    results.append(bench_case(
        "fused_add_rms_norm 4096 x 4096",
        lambda: rmsnorm.fused_add_rms_norm(x2.copy_(x), r2.copy_(residual), weight, 1e-6)[0],
        lambda: rmsnorm.fused_add_rms_norm_ref(x3.copy_(x), r3.copy_(residual), weight, 1e-6)[0],
        8 * x.numel() * es / 1e9,  # counts the copies that reset the inputs (timed on both sides)
    ))

    cache = rotary.compute_cos_sin_cache(1.0 / 10000 ** (torch.arange(0, 128, 2, device=device) / 128), 8192)
    positions = torch.randint(0, 8192, (tokens,), device=device)
    query, key2 = torch.randn(tokens, 32 * 128, dtype=dtype, device=device), torch.randn(tokens, 8 * 128, dtype=dtype,
                                                                                        device=device)
    q_a, k_a, q_b, k_b = query.clone(), key2.clone(), query.clone(), key2.clone()
    results.append(bench_case(
        "rotary 4096 tok x (32 + 8) x 128",
        lambda: (rotary.rotary_embedding(positions, q_a.copy_(query), k_a.copy_(key2), cache, 128, True), q_a)[1],
        lambda: (rotary.rotary_embedding_ref(positions, q_b.copy_(query), k_b.copy_(key2), cache, 128, True), q_b)[1],
        4 * (query.numel() + key2.numel()) * es / 1e9,  # counts the resetting copies
    ))

    gate_up = torch.randn(tokens, 2 * 14336, dtype=dtype, device=device)
    results.append(bench_case("silu_and_mul 4096 x 14336", lambda: activation.silu_and_mul(gate_up),
                              lambda: activation.silu_and_mul_ref(gate_up), 1.5 * gate_up.numel() * es / 1e9))
    return results


def bench_penalties(device: torch.device) -> list[Result]:
    from conveyor.kernels import sampling

    results = []
    seqs, vocab = 256, 128256
    logits = torch.randn(seqs, vocab, device=device)
    prompt_mask = torch.rand(seqs, vocab, device=device) < 0.01
    counts = (torch.rand(seqs, vocab, device=device) < 0.01).int()
    penalties = [torch.full((seqs,), v, device=device) for v in (1.1, 0.2, 0.3)]
    l_a, l_b = logits.clone(), logits.clone()
    results.append(bench_case(
        "apply_penalties 256 x 128256",
        lambda: (sampling.apply_penalties(l_a.copy_(logits), prompt_mask, counts, *penalties), l_a)[1],
        lambda: (sampling.apply_penalties_ref(l_b.copy_(logits), prompt_mask, counts, *penalties), l_b)[1],
        (2 * 4 + 1 + 4 + 8) * logits.numel() / 1e9,  # logits r/w, mask, counts, resetting copy
    ))
    return results


def compile_cases(attention_dtypes: tuple[str, ...]) -> list[tuple]:
    """(kernel, pointer types, constexprs, num_warps) of every kernel in the shapes models use."""
    from conveyor.kernels import activation, attention, kv_store, quant_matmul, rmsnorm, rotary, sampling

    def attention_ptrs(dt, *names):
        return {n: f"*{dt}" for n in names} | {n: "*i32" for n in ("query_start_loc_ptr", "seq_lens_ptr",
                                                                   "block_tables_ptr")}

    half_loads = dict(HEAD_DIM=80, HEAD_PAD=128, BLOCK_SIZE=16, USE_WINDOW=True)
    cases = []
    for dt in attention_dtypes:
        fp32, tile_n = dt == "fp32", 32 if dt == "fp32" else 64
        cases += [
            (attention._paged_attention_kernel, attention_ptrs(dt, "q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr"),
             dict(half_loads, QUERIES_PER_KV=4, QPK_PAD=4, BLOCK_Q=16, TILE_N=tile_n, FP32=fp32), 4),
            (attention._paged_attention_kernel, attention_ptrs(dt, "q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr"),
             dict(HEAD_DIM=128, HEAD_PAD=128, BLOCK_SIZE=32, USE_WINDOW=False, QUERIES_PER_KV=8, QPK_PAD=16,
                  BLOCK_Q=1, TILE_N=tile_n, FP32=fp32), 4),
            (attention._decode_split_kv_kernel,
             attention_ptrs(dt, "q_ptr", "k_cache_ptr", "v_cache_ptr") | {n: "*fp32" for n in (
                 "part_acc_ptr", "part_m_ptr", "part_l_ptr")},
             dict(half_loads, QUERIES_PER_KV=4, QPK_PAD=16, TILE_N=tile_n, FP32=fp32), 4),
        ]
    cases += [
        (attention._decode_split_kv_reduce_kernel,
         {"part_acc_ptr": "*fp32", "part_m_ptr": "*fp32", "part_l_ptr": "*fp32", "out_ptr": "*bf16",
          "query_start_loc_ptr": "*i32"}, dict(HEAD_DIM=80, HEAD_PAD=128, SPLITS_PAD=16), 4),
        (kv_store._store_kv_kernel, {n: "*bf16" for n in ("key_ptr", "value_ptr", "k_cache_ptr", "v_cache_ptr")}
         | {"slot_mapping_ptr": "*i64"}, dict(NUM_KV_HEADS=8, HEAD_DIM=128, BLOCK_SIZE=16, BLOCK_H=8, BLOCK_D=128), 4),
        (rmsnorm._rms_norm_kernel, {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16"}, dict(BLOCK=4096), 8),
        (rmsnorm._fused_add_rms_norm_kernel, {"x_ptr": "*fp16", "res_ptr": "*fp16", "w_ptr": "*fp16"},
         dict(BLOCK=8192), 16),
        (rotary._rotary_kernel, {"positions_ptr": "*i64", "q_ptr": "*bf16", "k_ptr": "*bf16", "cache_ptr": "*fp32"},
         dict(HALF=40, HALF_PAD=64, IS_NEOX=True, Q_HEADS_PAD=32, K_HEADS_PAD=8), 4),
        (rotary._rotary_kernel, {"positions_ptr": "*i64", "q_ptr": "*fp16", "k_ptr": "*fp16", "cache_ptr": "*fp32"},
         dict(HALF=64, HALF_PAD=64, IS_NEOX=False, Q_HEADS_PAD=64, K_HEADS_PAD=8), 4),
        (activation._silu_and_mul_kernel, {"x_ptr": "*bf16", "out_ptr": "*bf16"}, dict(BLOCK=1024), 4),
        (sampling._apply_penalties_kernel,
         {"logits_ptr": "*fp32", "prompt_mask_ptr": "*u8", "counts_ptr": "*i32", "rep_ptr": "*fp32",
          "presence_ptr": "*fp32", "frequency_ptr": "*fp32"}, dict(BLOCK=1024), 4),
    ]
    cases += [  # ggml's Q4_0, Q4_1, Q8_0 and Q4_K blocks (kernels/quant.py's QuantType)
        (quant_matmul._quant_matmul_kernel, {"x_ptr": f"*{dt}", "w_ptr": "*u8", "bias_ptr": f"*{dt}", "y_ptr": f"*{dt}"},
         dict(QTYPE=qtype, HAS_BIAS=True, FP32_DOT=dt == "fp32", BLOCK_M=16, BLOCK_N=64, BLOCK_K=64), 4)
        for qtype in (2, 3, 8, 12) for dt in ("bf16", "fp32")
    ]
    return cases


def compile_check(arch: int = 90, attention_dtypes: tuple[str, ...] = ("bf16", "fp16", "fp32")) -> list[str]:
    """Compile every kernel for a CUDA target without a GPU; returns the failures."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    floats = {"qk_scale", "eps"}
    failures = []
    for kernel, ptrs, constexprs, num_warps in compile_cases(attention_dtypes):
        signature = {
            name: "constexpr" if name in constexprs else ptrs.get(name, "fp32" if name in floats else "i32")
            for name in kernel.arg_names
        }
        label = f"{kernel.__name__} {sorted(set(ptrs.values()))} {constexprs}"
        start = time.perf_counter()
        try:
            triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": num_warps})
            print(f"ok    {time.perf_counter() - start:5.1f}s  {label}")
        except Exception as exc:  # report every failing kernel, not only the first
            failures.append(f"{label}: {exc}")
            print(f"FAIL  {label}\n{exc}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--out", help="write the results as JSON to this path")
    parser.add_argument("--compile-check", action="store_true", help="compile all kernels for sm_90 and exit")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability for --compile-check")
    parser.add_argument("--attention-dtypes", default="bf16,fp16,fp32",
                        help="attention variants for --compile-check (fp32 is the upcast path)")
    args = parser.parse_args(argv)

    if args.compile_check:
        if os.environ.get("TRITON_INTERPRET") == "1":
            print("unset TRITON_INTERPRET for --compile-check: the interpreter replaces the compiler", file=sys.stderr)
            return 2
        failures = compile_check(args.arch, tuple(args.attention_dtypes.split(",")))
        print(f"{len(failures)} kernel configuration(s) failed to compile" if failures else "all kernels compile")
        return 1 if failures else 0
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        print("no CUDA device present (or TRITON_INTERPRET=1): nothing to benchmark")
        return 0

    device = torch.device("cuda")
    torch.manual_seed(0)
    copy_gbps = copy_bandwidth_gbps(device)
    results = run_benchmarks(getattr(torch, args.dtype), device)
    name = torch.cuda.get_device_name(device)
    print(f"{name}, {args.dtype}; device copy bandwidth {copy_gbps:.0f} GB/s")
    print(f"{'kernel':<52} {'triton ms':>10} {'torch ms':>10} {'speedup':>8} {'GB/s':>8} {'% copy':>7} {'max err':>9}")
    for r in results:
        print(f"{r.name:<52} {r.triton_ms:>10.4f} {r.torch_ms:>10.4f} {r.torch_ms / r.triton_ms:>7.2f}x "
              f"{r.gbps:>8.0f} {100 * r.gbps / copy_gbps:>6.0f}% {r.max_abs_err:>9.2e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "dtype": args.dtype, "copy_bandwidth_gbps": copy_gbps,
                       "results": [asdict(r) | {"gbps": r.gbps} for r in results]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
