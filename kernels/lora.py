"""LoRA's two halves over one adapter's rows of a batch, as punica's SGMV does over a segment:
`lora_shrink` (s = x[rows] A^T, float32) and `lora_expand` (y[rows, offset:offset+N] += s B^T, in
place). Each kernel gathers or scatters the rows itself, so the adapter's tokens are never copied
out of the batch or back; `rows` None means every row. A float32 model multiplies in full float32
(no TF32); bf16/fp16 ones on the tensor cores, accumulating in float32. The torch reference is
`TorchOps.lora_shrink` / `lora_expand` (gpu_worker/ops.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from conveyor.kernels.layout import HALF_OR_FLOAT, check_same_device, check_tensor, is_interpreted


@triton.jit
def _rows(rows_ptr, offs_m, mask_m, HAS_ROWS: tl.constexpr):
    if HAS_ROWS:
        return tl.load(rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    return offs_m.to(tl.int64)


@triton.jit
def _lora_shrink_kernel(x_ptr, rows_ptr, a_ptr, s_ptr, M, R, K, stride_x, stride_a, stride_s,
                        HAS_ROWS: tl.constexpr, FP32_DOT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m, mask_r = offs_m < M, offs_r < R
    rows = _rows(rows_ptr, offs_m, mask_m, HAS_ROWS)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + rows[:, None] * stride_x + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        a = tl.load(a_ptr + offs_r[None, :] * stride_a + offs_k[:, None], mask=mask_r[None, :] & mask_k[:, None],
                    other=0.0)  # A^T's tile [BLOCK_K, BLOCK_R]
        if FP32_DOT:
            acc = tl.dot(x.to(tl.float32), a.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, a.to(x.dtype), acc)
    tl.store(s_ptr + offs_m[:, None] * stride_s + offs_r[None, :], acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _lora_expand_kernel(s_ptr, rows_ptr, b_ptr, y_ptr, M, N, R, stride_s, stride_b, stride_y, offset,
                        HAS_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_R: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    rows = _rows(rows_ptr, offs_m, mask_m, HAS_ROWS)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        s = tl.load(s_ptr + offs_m[:, None] * stride_s + offs_r[None, :], mask=mask_m[:, None] & mask_r[None, :],
                    other=0.0)
        b = tl.load(b_ptr + offs_n[None, :] * stride_b + offs_r[:, None], mask=mask_n[None, :] & mask_r[:, None],
                    other=0.0)  # B^T's tile [BLOCK_R, BLOCK_N]
        acc = tl.dot(s, b.to(tl.float32), acc, input_precision="ieee")
    y = y_ptr + rows[:, None] * stride_y + offset + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    total = tl.load(y, mask=mask, other=0.0).to(tl.float32) + acc
    tl.store(y, total.to(y_ptr.dtype.element_ty), mask=mask)


def _fp32_dot(dtype: torch.dtype) -> bool:
    # float32 needs "ieee" dots; the interpreter keeps bf16 as raw bits, so there bf16 upcasts too
    return dtype == torch.float32 or (dtype == torch.bfloat16 and is_interpreted(_lora_shrink_kernel))


def _check_rows(rows: torch.Tensor | None, x: torch.Tensor) -> int:
    if rows is None:
        return x.shape[0]
    check_tensor("rows", rows, ndim=1, dtype=torch.int64, contiguous=True)
    return rows.shape[0]


def lora_shrink(x: torch.Tensor, rows: torch.Tensor | None, a: torch.Tensor) -> torch.Tensor:
    """x [T, K] (rows may be strided), rows [M] int64 (None: all T), A [R, K] -> new float32 [M, R]."""
    check_tensor("x", x, ndim=2, dtype=HALF_OR_FLOAT)
    check_tensor("a", a, ndim=2, dtype=x.dtype, shape=(None, x.shape[1]))
    m, (r, k) = _check_rows(rows, x), a.shape
    check_same_device(_lora_shrink_kernel, x=x, rows=rows, a=a)
    s = torch.empty(m, r, dtype=torch.float32, device=x.device)
    if m and r:
        block_m, block_r = 16 if m <= 16 else 64, max(16, min(64, triton.next_power_of_2(r)))
        grid = (triton.cdiv(m, block_m), triton.cdiv(r, block_r))
        _lora_shrink_kernel[grid](x, rows if rows is not None else x, a, s, m, r, k, x.stride(0), a.stride(0),
                                  s.stride(0), HAS_ROWS=rows is not None, FP32_DOT=_fp32_dot(x.dtype),
                                  BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=64, num_warps=4)
    return s


def lora_expand(s: torch.Tensor, rows: torch.Tensor | None, b: torch.Tensor, y: torch.Tensor, offset: int) -> None:
    """y[rows, offset:offset+N] += s B^T in place: s [M, R] float32 (columns may be a slice), B [N, R]."""
    check_tensor("s", s, ndim=2, dtype=torch.float32)
    check_tensor("y", y, ndim=2, dtype=HALF_OR_FLOAT)
    check_tensor("b", b, ndim=2, dtype=y.dtype, shape=(None, s.shape[1]))
    m, (n, r) = _check_rows(rows, y), b.shape
    if m != s.shape[0] or offset < 0 or offset + n > y.shape[1]:
        raise ValueError(f"s must have a row per row of y updated ({m}), got {s.shape[0]}, and columns "
                         f"{offset}:{offset + n} must lie within y's {y.shape[1]}")
    check_same_device(_lora_expand_kernel, s=s, rows=rows, b=b, y=y)
    if m and n and r:
        block_m, block_n = 16 if m <= 16 else 64, 64
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        _lora_expand_kernel[grid](s, rows if rows is not None else s, b, y, m, n, r, s.stride(0), b.stride(0),
                                  y.stride(0), offset, HAS_ROWS=rows is not None, BLOCK_M=block_m,
                                  BLOCK_N=block_n, BLOCK_R=max(16, min(64, triton.next_power_of_2(r))),
                                  num_warps=4)
