"""apply_penalties (Triton) against its reference and HF's repetition penalty, and wired into the sampler."""

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from conveyor.kernels.sampling import apply_penalties, apply_penalties_ref


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


def test_sampler_on_triton_ops_penalises_exactly_as_its_torch_path():
    from conveyor.sampling_params import SamplingParams
    from conveyor.gpu_worker.sampler import Sampler, make_sampling_state
    from conveyor.gpu_worker.triton_ops import TritonOps

    def states():
        kinds = [dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25), dict(),
                 dict(repetition_penalty=0.8, frequency_penalty=-0.5)]
        made = [make_sampling_state(SamplingParams(temperature=0.0, **kw), [1, 2, 3], "cpu", seed=0) for kw in kinds]
        for st in made:
            st.output_token_ids.extend([3, 9, 9, 40])
        return made

    logits = penalty_inputs(num_seqs=3, vocab=64)[0]
    on_triton, on_torch = logits.clone(), logits.clone()
    tokens = Sampler(64, penalties=TritonOps.penalties)(on_triton, states()).sampled_token_ids
    assert tokens == Sampler(64)(on_torch, states()).sampled_token_ids
    assert torch.equal(on_triton, on_torch) and not torch.equal(on_triton, logits)
