"""apply_penalties (Triton) and top_k_top_p_filter (torch) against references and HF's warpers."""

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from conveyor.kernels.sampling import apply_penalties, apply_penalties_ref, top_k_top_p_filter, top_k_top_p_filter_ref


def penalty_inputs(num_seqs=4, vocab=1500, seed=0):  # vocab 1500: two column blocks, ragged
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_seqs, vocab, generator=gen) * 3
    prompt_mask = torch.rand(num_seqs, vocab, generator=gen) < 0.1
    seen = torch.rand(num_seqs, vocab, generator=gen) < 0.1
    counts = torch.randint(1, 5, (num_seqs, vocab), generator=gen, dtype=torch.int32) * seen
    penalties = dict(
        repetition_penalty=torch.tensor([1.0, 1.3, 0.8, 1.1])[:num_seqs],
        presence_penalty=torch.tensor([0.0, 0.5, -0.2, 0.1])[:num_seqs],
        frequency_penalty=torch.tensor([0.0, 0.3, 0.1, -0.5])[:num_seqs],
    )
    return logits, prompt_mask, counts.int(), penalties


def test_apply_penalties_matches_reference_exactly():
    logits, prompt_mask, counts, penalties = penalty_inputs()
    expected = logits.clone()
    apply_penalties_ref(expected, prompt_mask, counts, **penalties)
    apply_penalties(logits, prompt_mask, counts, **penalties)
    assert torch.equal(logits, expected)


def test_neutral_penalties_leave_the_row_unchanged():
    logits, prompt_mask, counts, penalties = penalty_inputs()
    before = logits[0].clone()
    apply_penalties(logits, prompt_mask, counts, **penalties)
    assert torch.equal(logits[0], before)


def test_repetition_penalty_reference_matches_hugging_face_on_prompt_and_output_tokens():
    logits, prompt_mask, counts, penalties = penalty_inputs(num_seqs=2, vocab=50)
    tokens = torch.cat([prompt_mask[1].nonzero()[:, 0], counts[1].nonzero()[:, 0]])
    expected = RepetitionPenaltyLogitsProcessor(1.3)(tokens[None], logits[1:2].clone())
    only_repetition = dict(penalties, presence_penalty=torch.zeros(2), frequency_penalty=torch.zeros(2))
    apply_penalties_ref(logits, prompt_mask, counts, **only_repetition)
    assert torch.equal(logits[1:2], expected)


def test_apply_penalties_reads_strided_rows():
    logits, prompt_mask, counts, penalties = penalty_inputs(vocab=64)
    wide = torch.zeros(4, 100)
    wide[:, :64] = logits
    apply_penalties_ref(logits, prompt_mask, counts, **penalties)
    apply_penalties(wide[:, :64], prompt_mask, counts, **penalties)
    assert torch.equal(wide[:, :64], logits) and not wide[:, 64:].any()


@pytest.mark.parametrize("name,bad,message", [
    ("logits", lambda t: t.half(), "logits must have dtype torch.float32"),
    ("prompt_mask", lambda t: t.int(), "prompt_mask must have dtype torch.bool"),
    ("output_counts", lambda t: t.long(), "output_counts must have dtype torch.int32"),
    ("output_counts", lambda t: t[:, :10], "output_counts must have shape"),
    ("repetition_penalty", lambda t: t[:2], r"repetition_penalty must have shape \[4\]"),
])
def test_apply_penalties_bad_layout_raises_value_error(name, bad, message):
    logits, prompt_mask, counts, penalties = penalty_inputs(vocab=16)
    args = dict(logits=logits, prompt_mask=prompt_mask, output_counts=counts, **penalties)
    args[name] = bad(args[name])
    with pytest.raises(ValueError, match=message):
        apply_penalties(**args)


def test_top_k_top_p_filter_matches_hugging_face_row_by_row():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 200, generator=gen) * 2
    top_k = torch.tensor([0, 5, 0, 50, 200, 20], dtype=torch.int32)
    top_p = torch.tensor([1.0, 1.0, 0.7, 0.3, 0.95, 0.5])
    filtered = top_k_top_p_filter(logits.clone(), top_k, top_p)
    for row, (k, p) in enumerate(zip(top_k.tolist(), top_p.tolist())):
        expected = logits[row:row + 1].clone()
        if 0 < k < 200:
            expected = TopKLogitsWarper(k)(None, expected)
        if p < 1.0:
            expected = TopPLogitsWarper(p)(None, expected)
        assert torch.equal(filtered[row:row + 1], expected), f"row {row} (top_k {k}, top_p {p})"
    assert torch.equal(filtered, top_k_top_p_filter_ref(logits.clone(), top_k, top_p))


def test_top_k_keeps_every_token_tied_with_the_kth_largest():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 3.0, 0.0]])
    filtered = top_k_top_p_filter(logits.clone(), torch.tensor([2]), torch.tensor([1.0]))
    assert torch.equal(filtered, TopKLogitsWarper(2)(None, logits.clone()))
    assert filtered.isfinite().sum() == 3


def test_disabled_rows_keep_even_tokens_with_zero_probability():
    logits = torch.tensor([[0.0, -1000.0, 5.0]])
    filtered = top_k_top_p_filter(logits.clone(), torch.tensor([0]), torch.tensor([1.0]))
    assert torch.equal(filtered, logits)


def test_top_k_top_p_filter_works_in_place_and_keeps_at_least_one_token():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.0, 9.0]])
    result = top_k_top_p_filter(logits, torch.tensor([1, 0]), torch.tensor([1.0, 0.01]))
    assert result is logits
    assert torch.equal(logits.isfinite(), torch.tensor([[False, True, False], [False, False, True]]))
