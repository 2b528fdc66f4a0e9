"""SwiGLU: `silu(gate) * up` for x `[T, 2*I]` holding gate in the first half, up in the second.

Rounded as the model's own `act_fn(gate_proj(x)) * up_proj(x)` is: silu computed in fp32 and
rounded to x's dtype, then the product rounded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from conveyor.kernels.layout import HALF_OR_FLOAT, check_same_device, check_tensor

_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + offs, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (act * up).to(dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x `[T, 2*I]` (rows may be strided) -> new `[T, I]` tensor of x's dtype."""
    check_tensor("x", x, ndim=2, dtype=HALF_OR_FLOAT)
    if x.shape[1] % 2:
        raise ValueError(f"x width must be even (gate | up), got {x.shape[1]}")
    check_same_device(_silu_and_mul_kernel, x=x)
    num_tokens, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty(num_tokens, inter, dtype=x.dtype, device=x.device)
    if num_tokens and inter:
        block = min(_BLOCK, triton.next_power_of_2(inter))
        _silu_and_mul_kernel[(num_tokens, triton.cdiv(inter, block))](
            x, out, x.stride(0), out.stride(0), inter, BLOCK=block, num_warps=4,
        )
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
