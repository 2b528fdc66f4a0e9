"""Paged attention over the block KV cache, for a flattened batch of decode and prefill queries.

Layout (docs/architecture.md): q/out `[T, num_heads, head_dim]`; k_cache/v_cache
`[num_blocks, block_size, num_kv_heads, head_dim]`; sequence b owns query tokens
`query_start_loc[b]:query_start_loc[b+1]`, its context `seq_lens[b]` includes them (their K/V are
already in the cache), and query token i sits at position `seq_lens[b] - q_len_b + i`.

`paged_attention` runs one launch for the whole mixed batch: each program takes a tile of query
tokens of one sequence times the query heads sharing one KV head (GQA packed into the tile's rows),
and streams that sequence's keys through an online softmax in fp32. For an all-decode batch with
too few (sequence, KV head) pairs to fill the GPU it switches to the split-KV (flash-decoding)
kernel, which cuts each context into `num_splits` parts and merges them in a reduce kernel.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from conveyor.kernels.layout import HALF_OR_FLOAT, check_same_device, check_tensor, is_interpreted

_LOG2E = 1.4426950408889634
_MIN_TOKENS_PER_SPLIT = 256
_MAX_SPLITS = 64


@triton.jit
def _find_sequence(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q: tl.constexpr):
    # Sequence b owns q blocks [query_start_loc[b] // BLOCK_Q + b, query_start_loc[b+1] // BLOCK_Q + b + 1):
    # at least ceil(q_len_b / BLOCK_Q) of them, found without a host-side table.
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tile(
    q, acc, m_i, l_i, q_pos, start_n, kv_end, sliding_window,
    k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    qk_scale, offs_d, d_valid,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, USE_WINDOW: tl.constexpr, FP32: tl.constexpr,
):
    offs_n = start_n + tl.arange(0, TILE_N)
    n_valid = offs_n < kv_end
    block_ids = tl.load(block_table_ptr + offs_n // BLOCK_SIZE, mask=n_valid, other=0).to(tl.int64)
    in_block = offs_n % BLOCK_SIZE
    k_off = block_ids * stride_kb + in_block * stride_ks + kv_head * stride_kh
    v_off = block_ids * stride_vb + in_block * stride_vs + kv_head * stride_vh
    k_mask = d_valid[:, None] & n_valid[None, :]
    k = tl.load(k_cache_ptr + k_off[None, :] + offs_d[:, None], mask=k_mask, other=0.0)  # [HEAD_PAD, TILE_N]
    v_mask = n_valid[:, None] & d_valid[None, :]
    v = tl.load(v_cache_ptr + v_off[:, None] + offs_d[None, :], mask=v_mask, other=0.0)  # [TILE_N, HEAD_PAD]
    if FP32:
        qk = tl.dot(q, k.to(tl.float32), input_precision="ieee")
    else:
        qk = tl.dot(q, k)

    visible = (offs_n[None, :] <= q_pos[:, None]) & n_valid[None, :]
    if USE_WINDOW:
        visible = visible & (offs_n[None, :] > q_pos[:, None] - sliding_window)
    qk = tl.where(visible, qk * qk_scale, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
    p = tl.exp2(qk - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if FP32:
        acc += tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
    qk_scale, num_seqs, sliding_window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    QUERIES_PER_KV: tl.constexpr, QPK_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr,
    USE_WINDOW: tl.constexpr, FP32: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_Q * QPK_PAD
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_sequence(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    local_block = q_block - (q_start // BLOCK_Q + seq)
    if local_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len

    # Row r of the tile: query token r // QPK_PAD of this block, query head r % QPK_PAD of the KV group.
    offs_m = tl.arange(0, BLOCK_M)
    q_tok = local_block * BLOCK_Q + offs_m // QPK_PAD
    head = kv_head * QUERIES_PER_KV + offs_m % QPK_PAD
    row_valid = (q_tok < q_len) & (offs_m % QPK_PAD < QUERIES_PER_KV)
    q_pos = context + q_tok
    offs_d = tl.arange(0, HEAD_PAD)
    d_valid = offs_d < HEAD_DIM
    q_rows = (q_start + q_tok).to(tl.int64)
    io_mask = row_valid[:, None] & d_valid[None, :]
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :], mask=io_mask, other=0.0)
    if FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    kv_end = context + tl.minimum(local_block * BLOCK_Q + BLOCK_Q, q_len)  # last visible key + 1
    kv_begin = 0
    if USE_WINDOW:
        kv_begin = tl.maximum(context + local_block * BLOCK_Q - sliding_window + 1, 0)
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start_n in range(kv_begin, kv_end, TILE_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, q_pos, start_n, kv_end, sliding_window,
            k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            qk_scale, offs_d, d_valid, BLOCK_SIZE, TILE_N, USE_WINDOW, FP32,
        )

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out_ptrs = out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def _decode_split_kv_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
    qk_scale, sliding_window, num_heads, num_splits,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    QUERIES_PER_KV: tl.constexpr, QPK_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
    USE_WINDOW: tl.constexpr, FP32: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    token = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    kv_begin = 0
    if USE_WINDOW:
        kv_begin = tl.maximum(seq_len - sliding_window, 0)
    per_split = tl.cdiv(tl.cdiv(seq_len - kv_begin, num_splits), TILE_N) * TILE_N
    lo = kv_begin + split * per_split
    hi = tl.minimum(lo + per_split, seq_len)

    offs_m = tl.arange(0, QPK_PAD)
    head = kv_head * QUERIES_PER_KV + offs_m
    row_valid = offs_m < QUERIES_PER_KV
    q_pos = tl.zeros([QPK_PAD], tl.int32) + seq_len - 1
    offs_d = tl.arange(0, HEAD_PAD)
    d_valid = offs_d < HEAD_DIM
    io_mask = row_valid[:, None] & d_valid[None, :]
    q = tl.load(q_ptr + token * stride_qt + head[:, None] * stride_qh + offs_d[None, :], mask=io_mask, other=0.0)
    if FP32:
        q = q.to(tl.float32)

    m_i = tl.full([QPK_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([QPK_PAD], tl.float32)
    acc = tl.zeros([QPK_PAD, HEAD_PAD], tl.float32)
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start_n in range(lo, hi, TILE_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, q_pos, start_n, hi, sliding_window,
            k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            qk_scale, offs_d, d_valid, BLOCK_SIZE, TILE_N, USE_WINDOW, FP32,
        )

    # Partials [num_seqs, num_heads, num_splits, (HEAD_DIM)] in fp32; acc stays unnormalised.
    part_row = (seq * num_heads + head).to(tl.int64) * num_splits + split
    tl.store(part_m_ptr + part_row, m_i, mask=row_valid)
    tl.store(part_l_ptr + part_row, l_i, mask=row_valid)
    tl.store(part_acc_ptr + part_row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=io_mask)


@triton.jit
def _decode_split_kv_reduce_kernel(
    part_acc_ptr, part_m_ptr, part_l_ptr, out_ptr, query_start_loc_ptr,
    num_heads, num_splits, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    s_valid = offs_s < num_splits
    offs_d = tl.arange(0, HEAD_PAD)
    part_row = (seq * num_heads + head).to(tl.int64) * num_splits + offs_s
    m = tl.load(part_m_ptr + part_row, mask=s_valid, other=float("-inf"))
    l = tl.load(part_l_ptr + part_row, mask=s_valid, other=0.0)
    acc = tl.load(part_acc_ptr + part_row[:, None] * HEAD_DIM + offs_d[None, :],
                  mask=s_valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # an empty context (seq_len 0) yields zeros
    weight = tl.exp2(m - m_max)  # an empty split has m = -inf: weight 0
    denom = tl.sum(weight * l, 0)
    out = tl.sum(acc * weight[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    token = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
    *, scale: float, max_query_len: int, max_seq_len: int,
    sliding_window: int | None = None, num_decodes: int = 0,
) -> torch.Tensor:
    """Write attention of every query token into `out` (and return it). One launch for a mixed batch;
    an all-decode batch (max_query_len == 1) with long contexts and few sequences goes split-KV.
    Rows of `out` past query_start_loc[-1] (padding tokens) are left as they were."""
    _check_inputs(q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables, sliding_window, num_decodes)
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    num_kv_heads = k_cache.shape[2]
    if max_query_len == 1 and num_tokens == num_seqs:
        span = max_seq_len if sliding_window is None else min(max_seq_len, sliding_window)
        num_splits = choose_num_splits(num_seqs, num_kv_heads, span, q.device)
        if num_splits > 1:
            return _launch_split_kv(q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables,
                                    scale, sliding_window, num_splits)

    qpk = num_heads // num_kv_heads
    qpk_pad = triton.next_power_of_2(qpk)
    target_rows = 16 if max_query_len == 1 else 64
    block_q = min(max(1, target_rows // qpk_pad), triton.next_power_of_2(max(max_query_len, 1)))
    qpk_pad = max(qpk_pad, 16 // block_q)  # tl.dot needs at least 16 rows
    fp32 = _fp32_path(_paged_attention_kernel, q.dtype)
    tile_n = 32 if fp32 or head_dim > 128 else 64
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables,
        scale * _LOG2E, num_seqs, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0),
        QUERIES_PER_KV=qpk, QPK_PAD=qpk_pad, HEAD_DIM=head_dim, HEAD_PAD=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=k_cache.shape[1], BLOCK_Q=block_q, TILE_N=tile_n,
        USE_WINDOW=sliding_window is not None, FP32=fp32,
        num_warps=4 if block_q * qpk_pad <= 64 else 8,
    )
    return out


def paged_attention_decode_split_kv(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
    *, scale: float, max_query_len: int, max_seq_len: int,
    sliding_window: int | None = None, num_decodes: int = 0, num_splits: int | None = None,
) -> torch.Tensor:
    """Flash-decoding for an all-decode batch: each (sequence, KV head) context is cut into
    `num_splits` parts (chosen by `choose_num_splits` when None) attended in parallel, then merged."""
    _check_inputs(q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables, sliding_window, num_decodes)
    if max_query_len != 1:
        raise ValueError(f"split-KV attention takes decode batches only (max_query_len 1), got {max_query_len}")
    num_tokens, num_seqs = q.shape[0], seq_lens.shape[0]
    if num_tokens != num_seqs:
        raise ValueError(f"a decode batch has one query token per sequence, got {num_tokens} tokens for {num_seqs}")
    if num_seqs == 0:
        return out
    num_kv_heads = k_cache.shape[2]
    if num_splits is None:
        span = max_seq_len if sliding_window is None else min(max_seq_len, sliding_window)
        num_splits = choose_num_splits(num_seqs, num_kv_heads, span, q.device)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    return _launch_split_kv(q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables,
                            scale, sliding_window, num_splits)


def _launch_split_kv(q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables, scale, sliding_window,
                     num_splits):
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    qpk = num_heads // num_kv_heads
    head_pad = triton.next_power_of_2(head_dim)
    fp32 = _fp32_path(_decode_split_kv_kernel, q.dtype)
    part_acc = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    part_m = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    _decode_split_kv_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, part_acc, part_m, part_l, query_start_loc, seq_lens, block_tables,
        scale * _LOG2E, sliding_window or 0, num_heads, num_splits,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0),
        QUERIES_PER_KV=qpk, QPK_PAD=max(16, triton.next_power_of_2(qpk)), HEAD_DIM=head_dim, HEAD_PAD=head_pad,
        BLOCK_SIZE=k_cache.shape[1], TILE_N=32 if fp32 else 64,
        USE_WINDOW=sliding_window is not None, FP32=fp32, num_warps=4,
    )
    _decode_split_kv_reduce_kernel[(num_seqs, num_heads)](
        part_acc, part_m, part_l, out, query_start_loc, num_heads, num_splits, out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, HEAD_PAD=head_pad, SPLITS_PAD=triton.next_power_of_2(num_splits), num_warps=4,
    )
    return out


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Enough splits for about two programs per SM, each covering at least 256 keys."""
    programs = num_seqs * num_kv_heads
    sms = _num_sms(device)
    if programs >= sms:
        return 1
    return max(1, min(math.ceil(2 * sms / programs), max_context // _MIN_TOKENS_PER_SPLIT, _MAX_SPLITS))


def paged_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
    *, scale: float, max_query_len: int, max_seq_len: int,
    sliding_window: int | None = None, num_decodes: int = 0,
) -> torch.Tensor:
    """Same contract as `paged_attention`, in plain torch and fp32, one sequence at a time."""
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    qpk = q.shape[1] // num_kv_heads
    k_slots = k_cache.reshape(-1, num_kv_heads, head_dim)
    v_slots = v_cache.reshape(-1, num_kv_heads, head_dim)
    starts = query_start_loc.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        q_start, q_end = starts[b], starts[b + 1]
        if q_end == q_start:
            continue
        key_pos = torch.arange(seq_len, device=q.device)
        slots = block_tables[b, key_pos // block_size].long() * block_size + key_pos % block_size
        k = k_slots[slots].float().repeat_interleave(qpk, dim=1)  # [seq_len, num_heads, head_dim]
        v = v_slots[slots].float().repeat_interleave(qpk, dim=1)
        q_pos = seq_len - (q_end - q_start) + torch.arange(q_end - q_start, device=q.device)
        visible = key_pos[None, :] <= q_pos[:, None]
        if sliding_window is not None:
            visible &= key_pos[None, :] > q_pos[:, None] - sliding_window
        scores = torch.einsum("qhd,khd->hqk", q[q_start:q_end].float(), k) * scale
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        out[q_start:q_end] = torch.einsum("hqk,khd->qhd", probs, v).to(out.dtype)
    return out


def _fp32_path(kernel, dtype: torch.dtype) -> bool:
    # fp32 inputs need fp32 ("ieee") dots; the interpreter keeps bf16 as raw bits, so it upcasts too.
    return dtype == torch.float32 or (dtype == torch.bfloat16 and is_interpreted(kernel))


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter: pretend to be an H100


def _check_inputs(q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables, sliding_window, num_decodes):
    check_tensor("q", q, ndim=3, dtype=HALF_OR_FLOAT)
    check_tensor("out", out, shape=tuple(q.shape), dtype=q.dtype)
    check_tensor("k_cache", k_cache, ndim=4, dtype=q.dtype)
    check_tensor("v_cache", v_cache, shape=tuple(k_cache.shape), dtype=q.dtype)
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache head_dim {k_cache.shape[3]} differs from q head_dim {head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")
    check_tensor("seq_lens", seq_lens, ndim=1, dtype=torch.int32)
    num_seqs = seq_lens.shape[0]
    check_tensor("query_start_loc", query_start_loc, shape=(num_seqs + 1,), dtype=torch.int32)
    check_tensor("block_tables", block_tables, shape=(num_seqs, None), dtype=torch.int32)
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be None or >= 1, got {sliding_window}")
    if not 0 <= num_decodes <= num_seqs:
        raise ValueError(f"num_decodes must be in [0, {num_seqs}], got {num_decodes}")
    check_same_device(
        _paged_attention_kernel, q=q, k_cache=k_cache, v_cache=v_cache, out=out,
        query_start_loc=query_start_loc, seq_lens=seq_lens, block_tables=block_tables,
    )
