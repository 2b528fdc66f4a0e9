"""Logit processing for the batched sampler, with the semantics of vLLM / Hugging Face.

- `apply_penalties`: a Triton kernel (one pass over `[S, V]` instead of torch's half-dozen).
- `top_k_top_p_filter`: torch on every device. It needs a per-row sort over the vocabulary;
  torch's segmented sort is as good as a Triton kernel would be, so there is none.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from conveyor.kernels.layout import check_same_device, check_tensor

_BLOCK_V = 1024


@triton.jit
def _apply_penalties_kernel(
    logits_ptr, prompt_mask_ptr, counts_ptr, rep_ptr, presence_ptr, frequency_ptr,
    stride_logits, stride_mask, stride_counts, vocab, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < vocab
    rep = tl.load(rep_ptr + row)
    presence = tl.load(presence_ptr + row)
    frequency = tl.load(frequency_ptr + row)
    logits = tl.load(logits_ptr + row * stride_logits + offs, mask=mask, other=0.0)
    in_prompt = tl.load(prompt_mask_ptr + row * stride_mask + offs, mask=mask, other=0) != 0
    counts = tl.load(counts_ptr + row * stride_counts + offs, mask=mask, other=0)
    in_output = counts > 0
    penalised = tl.where(logits > 0, tl.math.div_rn(logits, rep), logits * rep)
    logits = tl.where(in_prompt | in_output, penalised, logits)
    logits = logits - frequency * counts.to(tl.float32)
    logits = logits - presence * in_output.to(tl.float32)
    tl.store(logits_ptr + row * stride_logits + offs, logits, mask=mask)


def apply_penalties(
    logits: torch.Tensor, prompt_mask: torch.Tensor, output_counts: torch.Tensor,
    repetition_penalty: torch.Tensor, presence_penalty: torch.Tensor, frequency_penalty: torch.Tensor,
) -> None:
    """In place on logits `[S, V]` fp32. Repetition penalty on tokens seen in the prompt or output
    (positive logits divided, others multiplied), then `-= frequency * count`, `-= presence * (count > 0)`.
    A row with penalties (1, 0, 0) is left as it was."""
    check_tensor("logits", logits, ndim=2, dtype=torch.float32)
    num_seqs, vocab = logits.shape
    check_tensor("prompt_mask", prompt_mask, shape=(num_seqs, vocab), dtype=torch.bool)
    check_tensor("output_counts", output_counts, shape=(num_seqs, vocab), dtype=torch.int32)
    for name, t in (("repetition_penalty", repetition_penalty), ("presence_penalty", presence_penalty),
                    ("frequency_penalty", frequency_penalty)):
        check_tensor(name, t, shape=(num_seqs,), dtype=torch.float32)
    check_same_device(
        _apply_penalties_kernel, logits=logits, prompt_mask=prompt_mask, output_counts=output_counts,
        repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
    )
    if logits.numel() == 0:
        return
    block = min(_BLOCK_V, triton.next_power_of_2(vocab))
    _apply_penalties_kernel[(num_seqs, triton.cdiv(vocab, block))](
        logits, prompt_mask.view(torch.uint8), output_counts, repetition_penalty, presence_penalty,
        frequency_penalty, logits.stride(0), prompt_mask.stride(0), output_counts.stride(0), vocab,
        BLOCK=block, num_warps=4, enable_fp_fusion=False,  # no FMA: round as torch's separate ops do
    )


def apply_penalties_ref(
    logits: torch.Tensor, prompt_mask: torch.Tensor, output_counts: torch.Tensor,
    repetition_penalty: torch.Tensor, presence_penalty: torch.Tensor, frequency_penalty: torch.Tensor,
) -> None:
    """Same contract as `apply_penalties` (in place), in plain torch."""
    in_output = output_counts > 0
    rep = torch.where(prompt_mask | in_output, repetition_penalty[:, None], 1.0)
    logits.copy_(torch.where(logits > 0, logits / rep, logits * rep))
    logits -= frequency_penalty[:, None] * output_counts
    logits -= presence_penalty[:, None] * in_output


def top_k_top_p_filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf, in place, what HF's TopKLogitsWarper then TopPLogitsWarper (min_tokens_to_keep=1)
    would remove, per row; returns logits. top_k 0 or >= V and top_p 1.0 disable a row's filter.
    One ascending sort per row; it never syncs with the host, so skip the call when no row filters."""
    check_tensor("logits", logits, ndim=2, dtype=(torch.float32, torch.float16, torch.bfloat16))
    num_seqs, vocab = logits.shape
    check_tensor("top_k", top_k, shape=(num_seqs,), dtype=(torch.int32, torch.int64))
    check_tensor("top_p", top_p, shape=(num_seqs,), dtype=torch.float32)
    if logits.numel() == 0:
        return logits
    sorted_logits, order = logits.sort(dim=-1)
    k = torch.where((top_k > 0) & (top_k < vocab), top_k.long(), vocab)
    kth_largest = sorted_logits.gather(1, (vocab - k)[:, None])
    sorted_logits.masked_fill_(sorted_logits < kth_largest, float("-inf"))
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1 - top_p)[:, None]
    drop[:, -1] = False
    drop &= (top_p < 1.0)[:, None]
    sorted_logits.masked_fill_(drop, float("-inf"))
    return logits.scatter_(1, order, sorted_logits)


def top_k_top_p_filter_ref(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """HF's warpers applied row by row (TopK then TopP, min_tokens_to_keep=1), in place; returns logits."""
    vocab = logits.shape[1]
    for row, k, p in zip(logits, top_k.tolist(), top_p.tolist()):
        if 0 < k < vocab:
            row.masked_fill_(row < torch.topk(row, k)[0][-1], float("-inf"))
        if p < 1.0:
            sorted_row, order = torch.sort(row, descending=False)
            drop = sorted_row.softmax(dim=-1).cumsum(dim=-1) <= (1 - p)
            drop[-1] = False
            row.masked_fill_(drop.scatter(0, order, drop), float("-inf"))
    return logits
