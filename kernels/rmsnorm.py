"""RMSNorm, computed the way Hugging Face's LlamaRMSNorm does it:
`h = x.float(); h = h * rsqrt(mean(h^2) + eps); out = weight * h.to(x.dtype)`, the last product
rounded to x's dtype (the output dtype here is always x's dtype).

`fused_add_rms_norm` is the decoder-layer pair `residual = x + residual; x = norm(residual)`,
the sum rounded to x's dtype first, as the model's own add would be. It works in place: the
new residual overwrites `residual`, the normed output overwrites `x`, and both are returned.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from conveyor.kernels.layout import HALF_OR_FLOAT, check_same_device, check_tensor


@triton.jit
def _normalize(h, w, hidden, eps, out_ptr):
    dtype = out_ptr.dtype.element_ty
    var = tl.sum(h * h, 0) / hidden
    normed = (h * tl.rsqrt(var + eps)).to(dtype).to(tl.float32)
    return (normed * w).to(dtype)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_out, hidden, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    h = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = _normalize(h, w, hidden, eps, out_ptr)
    tl.store(out_ptr + row * stride_out + offs, out, mask=mask)


@triton.jit
def _fused_add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, stride_x, stride_res, hidden, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    res = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0).to(tl.float32)
    new_res = (x + res).to(res_ptr.dtype.element_ty)
    tl.store(res_ptr + row * stride_res + offs, new_res, mask=mask)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = _normalize(new_res.to(tl.float32), w, hidden, eps, x_ptr)
    tl.store(x_ptr + row * stride_x + offs, out, mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x `[T, H]` (rows may be strided), weight `[H]`; returns a new `[T, H]` tensor of x's dtype."""
    _check(x, weight)
    check_same_device(_rms_norm_kernel, x=x, weight=weight)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.shape[0]:
        block, warps = _launch_shape(x.shape[1])
        _rms_norm_kernel[(x.shape[0],)](x, weight, out, x.stride(0), out.stride(0), x.shape[1], eps,
                                        BLOCK=block, num_warps=warps)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: `residual <- x + residual`, `x <- rms_norm(residual) * weight`; returns (x, residual)."""
    _check(x, weight)
    check_tensor("residual", residual, shape=tuple(x.shape), dtype=x.dtype)
    check_same_device(_fused_add_rms_norm_kernel, x=x, residual=residual, weight=weight)
    if x.shape[0]:
        block, warps = _launch_shape(x.shape[1])
        _fused_add_rms_norm_kernel[(x.shape[0],)](x, residual, weight, x.stride(0), residual.stride(0),
                                                  x.shape[1], eps, BLOCK=block, num_warps=warps)
    return x, residual


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h.to(x.dtype)).to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract (in place, returns (x, residual)) as `fused_add_rms_norm`, in plain torch."""
    residual.add_(x)
    x.copy_(rms_norm_ref(residual, weight, eps))
    return x, residual


def _launch_shape(hidden: int) -> tuple[int, int]:
    block = triton.next_power_of_2(hidden)
    return block, min(max(block // 512, 1), 16)


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    check_tensor("x", x, ndim=2, dtype=HALF_OR_FLOAT)
    check_tensor("weight", weight, shape=(x.shape[1],), dtype=HALF_OR_FLOAT)
