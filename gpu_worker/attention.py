"""Paged attention over the block-table KV cache: the step's metadata and the CPU (torch) path.

The layout and the meaning of every field are the contract in docs/architecture.md; the Triton
path (`kernels/attention.py`) implements the same contract for CUDA.
"""

from dataclasses import dataclass, field

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
    # The torch path's decode plan, built by the first layer that needs it and shared by the rest.
    decode_plan: "DecodePlan | None" = field(default=None, repr=False)


@dataclass(slots=True)
class DecodePlan:
    """What every layer's decode attention shares within a step: which cache blocks to gather,
    and the additive mask that hides the padding past each sequence's end."""

    block_ids: torch.Tensor  # [num_decodes * num_blocks] the blocks to gather, sequence-major
    num_blocks: int  # blocks gathered per sequence (those of the longest one)
    mask: torch.Tensor  # [num_decodes, 1, 1, num_blocks * block_size] float32: 0 or -inf
    positions: torch.Tensor  # [num_blocks * block_size] key positions, for sliding windows


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[num_blocks, block_size, kv_heads, D] cache, [B, n] block table -> [B, kv_heads, num_tokens, D]."""
    block_size = cache.shape[1]
    num_blocks = -(-num_tokens // block_size)
    kv = cache.index_select(0, block_tables[:, :num_blocks].flatten())
    kv = kv.view(block_tables.shape[0], num_blocks * block_size, *cache.shape[2:])[:, :num_tokens]
    return kv.transpose(1, 2)


def torch_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """q [T, H, D] -> out [T, H, D] in plain torch (the C kernel of `kernels/cpu` does it all in one
    call where it builds). Decodes run together, as two batched matmuls over their gathered contexts.
    Prefills run as SDPA calls, causal with their cached context before them: one call per run of
    consecutive prefills with equal query and context lengths (the runner orders them so).

    The matmul path reads cache slots past a sequence's end and masks them, so they must hold
    finite values (the runner zeroes its cache once, and only ever writes finite keys and values)."""
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        out[:nd] = _decode_attention(q[:nd], k_cache, v_cache, meta, scale, sliding_window)
    start, b, num_seqs = nd, nd, len(meta.query_lens_cpu)
    while b < num_seqs:
        # A run of prefills with equal query and context lengths shares its mask: one SDPA call.
        q_len, s = meta.query_lens_cpu[b], meta.seq_lens_cpu[b]
        end = b + 1
        while end < num_seqs and meta.query_lens_cpu[end] == q_len and meta.seq_lens_cpu[end] == s:
            end += 1
        n = end - b
        k = gather_kv(k_cache, meta.block_tables[b:end], s)
        v = gather_kv(v_cache, meta.block_tables[b:end], s)
        qb = q[start : start + n * q_len].view(n, q_len, *q.shape[1:]).transpose(1, 2)
        if q_len == s and sliding_window is None:
            o = F.scaled_dot_product_attention(qb, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            q_pos = torch.arange(s - q_len, s, device=q.device).unsqueeze(1)
            k_pos = torch.arange(s, device=q.device).unsqueeze(0)
            mask = k_pos <= q_pos
            if sliding_window is not None:
                mask &= k_pos > q_pos - sliding_window
            o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start : start + n * q_len] = o.transpose(1, 2).flatten(0, 1)
        start += n * q_len
        b = end
    return out


def _decode_plan(meta: AttentionMetadata, block_size: int, device: torch.device) -> DecodePlan:
    if meta.decode_plan is None:
        nd = meta.num_decodes
        num_blocks = -(-max(meta.seq_lens_cpu[:nd]) // block_size)
        positions = torch.arange(num_blocks * block_size, device=device)
        past_end = positions >= meta.seq_lens[:nd].unsqueeze(1)
        mask = torch.zeros(past_end.shape, device=device).masked_fill_(past_end, float("-inf"))
        block_ids = meta.block_tables[:nd, :num_blocks].flatten()
        meta.decode_plan = DecodePlan(block_ids, num_blocks, mask[:, None, None, :], positions)
    return meta.decode_plan


def _decode_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                      sliding_window: int | None) -> torch.Tensor:
    """q [B, H, D], one query token per sequence -> [B, H, D].

    Per sequence and KV head, the group of query heads that share it is one small matrix, so the
    whole batch is two batched matmuls: [B*KVH, G, D] @ [B*KVH, D, S] and [B*KVH, G, S] @ [B*KVH, S, D]."""
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    plan = _decode_plan(meta, block_size, q.device)
    s = plan.num_blocks * block_size

    def gather(cache: torch.Tensor) -> torch.Tensor:  # -> [B*KVH, S, D], contiguous for bmm
        kv = cache.index_select(0, plan.block_ids).view(num_seqs, s, num_kv_heads, head_dim)
        return kv.transpose(1, 2).reshape(num_seqs * num_kv_heads, s, head_dim)

    k, v = gather(k_cache), gather(v_cache)
    scores = torch.bmm((q * scale).view(num_seqs * num_kv_heads, group, head_dim), k.transpose(1, 2))
    scores = scores.view(num_seqs, num_kv_heads, group, s).float() + plan.mask
    if sliding_window is not None:
        first = meta.seq_lens[:num_seqs].unsqueeze(1) - sliding_window  # first visible position
        scores.masked_fill_((plan.positions < first)[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1).to(q.dtype).view(num_seqs * num_kv_heads, group, s)
    return torch.bmm(probs, v).view(num_seqs, num_heads, head_dim)
