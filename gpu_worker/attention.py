"""Paged attention over the block-table KV cache: the step's metadata and the CPU (torch) path.

The layout and the meaning of every field are the contract in docs/architecture.md; the Triton
path (`kernels/attention.py`) implements the same contract for CUDA.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64, -1 = padding
    query_start_loc: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32, context including this step's tokens
    block_tables: torch.Tensor  # [B, max_blocks] int32
    max_query_len: int
    max_seq_len: int
    num_decodes: int  # leading sequences with exactly one query token (so also their token count)
    # Host copies, so the CPU path never syncs on a device tensor to plan its work.
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[num_blocks, block_size, kv_heads, D] cache, [B, n] block table -> [B, kv_heads, num_tokens, D]."""
    block_size = cache.shape[1]
    num_blocks = -(-num_tokens // block_size)
    kv = cache[block_tables[:, :num_blocks]]  # [B, n, block_size, kv_heads, D]
    kv = kv.flatten(1, 2)[:, :num_tokens]
    return kv.transpose(1, 2)


def torch_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """q [T, H, D] -> out [T, H, D]. Decodes run as one batched SDPA over their gathered
    contexts; each prefill (few per step) runs as one SDPA with a causal offset mask."""
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        seq_lens = meta.seq_lens[:nd]
        s = max(meta.seq_lens_cpu[:nd])
        k = gather_kv(k_cache, meta.block_tables[:nd], s)
        v = gather_kv(v_cache, meta.block_tables[:nd], s)
        pos = torch.arange(s, device=q.device)
        mask = pos < seq_lens.unsqueeze(1)
        if sliding_window is not None:
            mask &= pos > (seq_lens.unsqueeze(1) - 1 - sliding_window)
        out[:nd] = F.scaled_dot_product_attention(
            q[:nd].unsqueeze(2), k, v, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True
        ).squeeze(2)
    start = nd
    for b in range(nd, len(meta.query_lens_cpu)):
        q_len, s = meta.query_lens_cpu[b], meta.seq_lens_cpu[b]
        k = gather_kv(k_cache, meta.block_tables[b : b + 1], s)
        v = gather_kv(v_cache, meta.block_tables[b : b + 1], s)
        qb = q[start : start + q_len].transpose(0, 1).unsqueeze(0)
        if q_len == s and sliding_window is None:
            o = F.scaled_dot_product_attention(qb, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            q_pos = torch.arange(s - q_len, s, device=q.device).unsqueeze(1)
            k_pos = torch.arange(s, device=q.device).unsqueeze(0)
            mask = k_pos <= q_pos
            if sliding_window is not None:
                mask &= k_pos > q_pos - sliding_window
            o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start : start + q_len] = o.squeeze(0).transpose(0, 1)
        start += q_len
    return out
