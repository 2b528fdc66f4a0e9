"""Rotary position embedding, applied in place to query and key.

`cos_sin_cache` is `[max_position, rot_dim]` fp32: cos in the first rot_dim/2 columns, sin in the
last (see `compute_cos_sin_cache`). Only the first rot_dim dims of each head rotate; the rest stay.
neox layout pairs dim i with i + rot_dim/2 (HF Llama's rotate_half); gpt-j pairs dims 2i and 2i+1.

The arithmetic follows HF Llama's `q * cos + rotate_half(q) * sin` in the model dtype: cos/sin
rounded to x's dtype, each product rounded, the sum rounded (no-ops in fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from conveyor.kernels.layout import HALF_OR_FLOAT, check_same_device, check_tensor


@triton.jit
def _rotate_heads(x_ptr, token, stride_t, stride_h, num_heads, cos, sin, offs_i, i_mask,
                  HALF: tl.constexpr, IS_NEOX: tl.constexpr, HEADS_PAD: tl.constexpr):
    offs_h = tl.arange(0, HEADS_PAD)
    if IS_NEOX:
        first, second = offs_i, offs_i + HALF
    else:
        first, second = 2 * offs_i, 2 * offs_i + 1
    base = x_ptr + token * stride_t + offs_h[:, None] * stride_h
    mask = (offs_h[:, None] < num_heads) & i_mask[None, :]
    dtype = x_ptr.dtype.element_ty
    x1 = tl.load(base + first[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + second[None, :], mask=mask, other=0.0).to(tl.float32)
    x1c = (x1 * cos).to(dtype).to(tl.float32)
    x2s = (x2 * sin).to(dtype).to(tl.float32)
    x2c = (x2 * cos).to(dtype).to(tl.float32)
    x1s = (x1 * sin).to(dtype).to(tl.float32)
    tl.store(base + first[None, :], (x1c - x2s).to(dtype), mask=mask)
    tl.store(base + second[None, :], (x2c + x1s).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr, q_ptr, k_ptr, cache_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
    num_heads, num_kv_heads,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, IS_NEOX: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr, K_HEADS_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token)
    offs_i = tl.arange(0, HALF_PAD)
    i_mask = offs_i < HALF
    row = cache_ptr + pos * stride_cache
    q_dtype = q_ptr.dtype.element_ty
    cos = tl.load(row + offs_i, mask=i_mask, other=0.0).to(q_dtype).to(tl.float32)[None, :]
    sin = tl.load(row + HALF + offs_i, mask=i_mask, other=0.0).to(q_dtype).to(tl.float32)[None, :]
    _rotate_heads(q_ptr, token, stride_qt, stride_qh, num_heads, cos, sin, offs_i, i_mask, HALF, IS_NEOX, Q_HEADS_PAD)
    _rotate_heads(k_ptr, token, stride_kt, stride_kh, num_kv_heads, cos, sin, offs_i, i_mask, HALF, IS_NEOX,
                  K_HEADS_PAD)


def rotary_embedding(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor,
    head_size: int, is_neox: bool,
) -> None:
    """Rotate query `[T, num_heads * head_size]` or `[T, num_heads, head_size]` and key (same, with
    num_kv_heads) in place at `positions` `[T]` int64. Rows of query/key may be strided views."""
    check_tensor("positions", positions, ndim=1, dtype=torch.int64)
    num_tokens = positions.shape[0]
    q_heads, q_stride_h = _heads("query", query, num_tokens, head_size)
    k_heads, k_stride_h = _heads("key", key, num_tokens, head_size)
    if key.dtype != query.dtype:
        raise ValueError(f"key dtype {key.dtype} differs from query dtype {query.dtype}")
    check_tensor("cos_sin_cache", cos_sin_cache, ndim=2, dtype=torch.float32)
    rot_dim = cos_sin_cache.shape[1]
    if rot_dim % 2 or not 0 < rot_dim <= head_size:
        raise ValueError(f"cos_sin_cache width (rot_dim) must be even and in (0, {head_size}], got {rot_dim}")
    check_same_device(_rotary_kernel, positions=positions, query=query, key=key, cos_sin_cache=cos_sin_cache)
    if num_tokens == 0:
        return
    half = rot_dim // 2
    _rotary_kernel[(num_tokens,)](
        positions, query, key, cos_sin_cache,
        query.stride(0), q_stride_h, key.stride(0), k_stride_h, cos_sin_cache.stride(0),
        q_heads, k_heads,
        HALF=half, HALF_PAD=triton.next_power_of_2(half), IS_NEOX=is_neox,
        Q_HEADS_PAD=triton.next_power_of_2(q_heads), K_HEADS_PAD=triton.next_power_of_2(k_heads),
        num_warps=4,
    )


def compute_cos_sin_cache(inv_freq: torch.Tensor, max_position: int, attention_scaling: float = 1.0) -> torch.Tensor:
    """`[max_position, 2 * len(inv_freq)]` fp32 on inv_freq's device: cos | sin of position * inv_freq,
    times attention_scaling, computed as HF's rotary embedding computes them."""
    t = torch.arange(max_position, dtype=torch.float32, device=inv_freq.device)
    freqs = torch.outer(t, inv_freq.float())
    return torch.cat([freqs.cos() * attention_scaling, freqs.sin() * attention_scaling], dim=-1)


def rotary_embedding_ref(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor,
    head_size: int, is_neox: bool,
) -> None:
    """Same contract as `rotary_embedding` (in place), in plain torch."""
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)
    for x in (query, key):
        heads = x.unflatten(-1, (-1, head_size)) if x.dim() == 2 else x
        rot = heads[..., : cos_sin_cache.shape[1]]
        c, s = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
        if is_neox:
            x1, x2 = rot.chunk(2, dim=-1)
            rot.copy_(torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1))
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            rot.copy_(torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).flatten(-2))


def _heads(name: str, x: torch.Tensor, num_tokens: int, head_size: int) -> tuple[int, int]:
    """(number of heads, stride between heads) of a 2-D or 3-D query/key."""
    check_tensor(name, x, ndim=(2, 3), dtype=HALF_OR_FLOAT)
    if x.shape[0] != num_tokens:
        raise ValueError(f"{name} has {x.shape[0]} tokens but positions has {num_tokens}")
    if x.dim() == 2:
        if x.shape[1] % head_size:
            raise ValueError(f"{name} width {x.shape[1]} is not a multiple of head_size {head_size}")
        return x.shape[1] // head_size, head_size
    if x.shape[2] != head_size:
        raise ValueError(f"{name} head size {x.shape[2]} differs from head_size {head_size}")
    return x.shape[1], x.stride(1)
