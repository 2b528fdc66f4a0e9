"""y = x W^T (+ bias) on CUDA with W kept in ggml blocks (a QuantizedWeight; layouts in
kernels/cpu/quant.c): each program dequantizes a [BLOCK_K, BLOCK_N] tile of W in registers from the
raw bytes and multiplies it with a [BLOCK_M, BLOCK_K] tile of x, accumulating in float32.

The tile is dequantized to float32 values equal to gguf's; float32 x multiplies them in full float32
precision (no TF32), half-precision x as that dtype on the tensor cores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from conveyor.kernels.layout import HALF_OR_FLOAT, check_same_device, check_tensor
from conveyor.kernels.quant import BLOCK, QuantizedWeight

@triton.jit
def _fp16_at(ptr, offs):
    lo = tl.load(ptr + offs).to(tl.uint16)
    hi = tl.load(ptr + offs + 1).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _dequantize_tile(w_ptr, offs_k, offs_n, mask_n, row_bytes, QTYPE: tl.constexpr):
    """W^T [BLOCK_K, BLOCK_N] as float32, for rows offs_n and columns offs_k of W."""
    row = tl.where(mask_n, offs_n, 0).to(tl.int64)[None, :] * row_bytes
    k = offs_k[:, None]
    if QTYPE == 12:  # Q4_K: 256-element super-blocks of 8 groups
        base = row + (k // 256) * 144
        j = (k % 256) // 32
        # group j's 6-bit scale and min (llama.cpp's get_scale_min_k4) from bytes j, j + 4 and j - 4
        a = tl.load(w_ptr + base + 4 + j)
        b = tl.load(w_ptr + base + 8 + j)
        c = tl.load(w_ptr + base + j)  # byte j - 4 of the scales where j >= 4
        scale = tl.where(j < 4, a & 63, (b & 0xF) | ((c >> 6) << 4))
        minimum = tl.where(j < 4, b & 63, (b >> 4) | ((a >> 6) << 4))
        code = (tl.load(w_ptr + base + 16 + (j // 2) * 32 + k % 32) >> ((j % 2) * 4)) & 0xF
        d = _fp16_at(w_ptr, base) * scale.to(tl.float32)
        dmin = _fp16_at(w_ptr, base + 2) * minimum.to(tl.float32)
        return d * code.to(tl.float32) - dmin
    elif QTYPE == 8:  # Q8_0
        base = row + (k // 32) * 34
        code = tl.load(w_ptr + base + 2 + k % 32).to(tl.int8, bitcast=True)
        return code.to(tl.float32) * _fp16_at(w_ptr, base)
    elif QTYPE == 2:  # Q4_0: byte i holds elements i (low nibble) and i + 16 (high)
        base = row + (k // 32) * 18
        code = (tl.load(w_ptr + base + 2 + k % 16) >> ((k % 32) // 16 * 4)) & 0xF
        return _fp16_at(w_ptr, base) * (code.to(tl.float32) - 8.0)
    else:  # Q4_1, nibbles as Q4_0's
        base = row + (k // 32) * 20
        code = (tl.load(w_ptr + base + 4 + k % 16) >> ((k % 32) // 16 * 4)) & 0xF
        return _fp16_at(w_ptr, base) * code.to(tl.float32) + _fp16_at(w_ptr, base + 2)


@triton.jit
def _quant_matmul_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, M, N, K, stride_x, stride_y, row_bytes,
                         QTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # K is a multiple of BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_x + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        w = _dequantize_tile(w_ptr, offs_k, offs_n, mask_n, row_bytes, QTYPE)
        if FP32_DOT:
            acc = tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_y + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def quant_matmul(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (rows may be strided) @ W^T (+ bias [N]) -> new [M, N] of x's dtype."""
    n, k = weight.shape
    check_tensor("x", x, ndim=2, dtype=HALF_OR_FLOAT, shape=(None, k))
    if bias is not None:
        check_tensor("bias", bias, dtype=HALF_OR_FLOAT, shape=(n,), contiguous=True)
    check_same_device(_quant_matmul_kernel, x=x, blocks=weight.blocks, bias=bias)
    m = x.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        block_m = 16 if m <= 16 else 64
        block_n, block_k = 64, 64 if k % 64 == 0 else 32
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        _quant_matmul_kernel[grid](
            x, weight.blocks, bias if bias is not None else x, y, m, n, k, x.stride(0), y.stride(0),
            k // BLOCK[weight.qtype][0] * BLOCK[weight.qtype][1], QTYPE=int(weight.qtype),
            HAS_BIAS=bias is not None, FP32_DOT=x.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_K=block_k, num_warps=4,
        )
    return y
