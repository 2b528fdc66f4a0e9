"""The sampler's penalties as a Triton kernel (one pass over `[S, V]` instead of torch's
half-dozen), with the semantics of vLLM / Hugging Face; `TritonOps.penalties` hands it to the
sampler on CUDA. Top-k / top-p stay in torch (`gpu_worker/sampler.py`): they need a per-row sort
over the vocabulary, which torch's segmented sort does as well as a Triton kernel would.
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
