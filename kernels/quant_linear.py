"""y = x W^T (+ bias) with W a QuantizedWeight, kept quantized.

On the CPU, a few rows of x (a decode step) go to the C GEMV, which dequantizes each weight block
in registers once for all rows; more rows (a prefill) dequantize W a panel of rows at a time into a
float32 scratch and multiply it with torch's GEMM. On CUDA, the Triton dequantizing matmul of
`quant_matmul`. Where the C kernels cannot be built, W is dequantized whole (the torch reference).
Results equal `x @ dequantize(W).T` up to the order of the float32 accumulation.
"""

from __future__ import annotations

import threading

import torch

from conveyor.kernels import cpu as cpu_kernels
from conveyor.kernels.quant import QuantizedWeight, dequantize

# Rows of x up to which the CPU GEMV beats dequantizing W for torch's GEMM (measured: about 32 to 40).
GEMV_MAX_ROWS = 32
# Elements of W dequantized at a time for a CPU GEMM (4 MiB of float32), into a scratch kept per
# thread so that its pages are touched once.
PANEL_ELEMENTS = 1 << 20
_scratch = threading.local()


def quantized_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] float32 or bf16 (float16 too on CUDA) -> [..., N] of x's dtype."""
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x must end in K = {k}, got shape {tuple(x.shape)}")
    rows = x if x.dim() == 2 else x.reshape(-1, k)
    if x.device.type != "cpu":
        from conveyor.kernels.quant_matmul import quant_matmul

        y = quant_matmul(rows, weight, bias)
    elif (kernels := cpu_kernels.load()) is None:
        y = torch.nn.functional.linear(rows.float(), dequantize(weight), None if bias is None else bias.float())
        y = y.to(x.dtype)
    elif rows.shape[0] <= GEMV_MAX_ROWS and rows.dtype in (torch.float32, torch.bfloat16) and rows.shape[0]:
        bias = bias if bias is None or bias.dtype is rows.dtype else bias.to(rows.dtype)
        y = kernels.quant_gemv(rows.contiguous(), weight.blocks, weight.qtype, weight.shape, bias)
    else:
        y = _cpu_gemm(kernels, rows, weight, bias)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], n)


def _panel_scratch(elements: int) -> torch.Tensor:
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < elements:
        buffer = _scratch.buffer = torch.empty(elements)
    return buffer


def _cpu_gemm(kernels, x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    n, k = weight.shape
    xf = x.float()
    panel_rows = max(1, PANEL_ELEMENTS // k)
    scratch = _panel_scratch(min(n, panel_rows) * k)
    if n <= panel_rows:
        w = kernels.quant_dequantize(weight.blocks, weight.qtype, (n, k), out=scratch)
        y = torch.mm(xf, w.t()) if bias is None else torch.addmm(bias.float(), xf, w.t())
        return y.to(x.dtype)
    y = torch.empty(x.shape[0], n)
    for start in range(0, n, panel_rows):
        end = min(n, start + panel_rows)
        w = kernels.quant_dequantize(weight.blocks[start:end], weight.qtype, (end - start, k), out=scratch)
        torch.mm(xf, w.t(), out=y[:, start:end])
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)
