import itertools

import pytest
import torch
from transformers.generation import logits_process as hf

from conveyor.sampling_params import SamplingParams
from conveyor.gpu_worker import sampler as sampler_module
from conveyor.gpu_worker.sampler import (Sampler, apply_logits_processing, apply_sampling_filters,
                                         compute_logprobs, make_sampling_state,
                                         resolve_logits_processor)

V = 32
# chi-square critical values at p = 0.001, by degrees of freedom
CHI2_CRIT_001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322,
                 8: 26.124, 9: 27.877, 10: 29.588, 11: 31.264, 12: 32.909}


UNSEEDED = itertools.count(1 << 40)  # each unseeded state's seed, distinct as the engine core's are


def state(prompt=(1, 2, 3), output=(), **kw):
    params = SamplingParams(**kw)
    seed = params.seed if params.seed is not None else next(UNSEEDED)
    st = make_sampling_state(params, list(prompt), "cpu", seed)
    st.output_token_ids.extend(output)
    return st


def rand_logits(rows, vocab=V, seed=0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def hf_row(processor, input_ids, row):
    return processor(torch.tensor([list(input_ids)]), row.unsqueeze(0).clone())[0]


def chi_square_ok(counts, probs):
    counts, probs = counts.double(), probs.double()
    n = counts.sum()
    support = probs > 0
    assert counts[~support].sum() == 0, "sampled a token of zero probability"
    expected = probs[support] * n
    stat = ((counts[support] - expected) ** 2 / expected).sum().item()
    return stat < CHI2_CRIT_001[int(support.sum()) - 1], stat


# -- greedy and logprobs ---------------------------------------------------------------------------

def test_greedy_rows_take_argmax():
    logits = rand_logits(4)
    out = Sampler(V)(logits.clone(), [state(temperature=0.0) for _ in range(4)])
    assert out.sampled_token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 4


def test_logprobs_are_raw_log_softmax_with_rank_and_top_n():
    logits = rand_logits(3)
    states = [state(temperature=0.0, logprobs=4, repetition_penalty=1.5, output=[5, 6]),
              state(temperature=0.8, logprobs=0, seed=1),
              state(temperature=0.0)]
    out = Sampler(V)(logits.clone(), states)
    ref = torch.log_softmax(logits, -1)
    for i in (0, 1):
        entry = out.logprobs[i]
        tok = out.sampled_token_ids[i]
        assert entry.token_id == tok
        assert entry.logprob == pytest.approx(ref[i, tok].item(), abs=1e-5)
        assert entry.rank == int((ref[i] > ref[i, tok]).sum()) + 1
    top = ref[0].topk(4)
    assert out.logprobs[0].top_token_ids == top.indices.tolist()
    assert out.logprobs[0].top_logprobs == pytest.approx(top.values.tolist(), abs=1e-5)
    assert out.logprobs[1].top_token_ids == [] and out.logprobs[2] is None


def test_compute_logprobs_rank_is_one_plus_number_of_more_likely_tokens():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    entries = compute_logprobs(logits, [2], 2)
    assert entries[0].rank == 3
    assert entries[0].top_token_ids == [1, 3]


def test_compute_logprobs_handles_per_row_top_n_for_prompt_positions():
    logits = rand_logits(5)
    entries = compute_logprobs(logits, [0, 1, 2, 3, 4], [0, 1, 2, 3, 4])
    ref = torch.log_softmax(logits, -1)
    assert [len(e.top_token_ids) for e in entries] == [0, 1, 2, 3, 4]
    assert [e.logprob for e in entries] == pytest.approx([ref[i, i].item() for i in range(5)], abs=1e-5)


# -- logits processing equals transformers' processors --------------------------------------------

def test_repetition_penalty_matches_transformers():
    logits = rand_logits(2)
    states = [state(prompt=[1, 2, 3], output=[4, 4, 9], repetition_penalty=1.3),
              state(prompt=[7, 8], output=[8, 20], repetition_penalty=0.7)]
    got = apply_logits_processing(logits.clone(), states)
    for i, st in enumerate(states):
        proc = hf.RepetitionPenaltyLogitsProcessor(st.params.repetition_penalty)
        want = hf_row(proc, st.prompt_token_ids + st.output_token_ids, logits[i])
        torch.testing.assert_close(got[i], want)


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = rand_logits(1)
    st = state(prompt=[1, 2], output=[2, 5, 5, 5], presence_penalty=0.5, frequency_penalty=0.25)
    got = apply_logits_processing(logits.clone(), [st])
    want = logits.clone()
    want[0, 2] -= 0.5 + 0.25
    want[0, 5] -= 0.5 + 3 * 0.25
    torch.testing.assert_close(got, want)


def test_output_counts_follow_tokens_appended_between_steps():
    logits = rand_logits(1)
    st = state(output=[4], frequency_penalty=1.0)
    apply_logits_processing(logits.clone(), [st])
    st.output_token_ids.extend([4, 6])
    got = apply_logits_processing(logits.clone(), [st])
    fresh = apply_logits_processing(logits.clone(), [state(output=[4, 4, 6], frequency_penalty=1.0)])
    torch.testing.assert_close(got, fresh)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_matches_transformers_at_every_step(n):
    gen = torch.Generator().manual_seed(n)
    prompt = torch.randint(0, 6, (5,), generator=gen).tolist()
    st = state(prompt=prompt, no_repeat_ngram_size=n)
    proc = hf.NoRepeatNGramLogitsProcessor(n)
    for step in range(12):
        logits = rand_logits(1, seed=step)
        got = apply_logits_processing(logits.clone(), [st])[0]
        want = hf_row(proc, st.prompt_token_ids + st.output_token_ids, logits[0])
        torch.testing.assert_close(got, want)
        st.output_token_ids.append(int(torch.randint(0, 6, (1,), generator=gen)))


def test_min_tokens_masks_eos_and_stop_ids_like_transformers():
    logits = rand_logits(1)
    st = state(prompt=[1, 2, 3], min_tokens=3, stop_token_ids=[7], eos_token_id=2)
    proc = hf.MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=3, min_new_tokens=3,
                                                eos_token_id=[7, 2])
    for next_token in (9, 10, 11, 12):
        got = apply_logits_processing(logits.clone(), [st])[0]
        want = hf_row(proc, st.prompt_token_ids + st.output_token_ids, logits[0])
        torch.testing.assert_close(got, want)
        st.output_token_ids.append(next_token)
    assert torch.isfinite(got).all()  # after min_tokens nothing is masked


def test_bad_words_match_transformers():
    bad = [[5], [6, 7], [8, 9, 10]]
    proc = hf.NoBadWordsLogitsProcessor(bad)
    logits = rand_logits(1)
    for output in ([], [6], [1, 8, 9], [8, 9, 6], [9, 8]):
        st = state(prompt=[11], output=output, bad_words_token_ids=bad)
        got = apply_logits_processing(logits.clone(), [st])[0]
        torch.testing.assert_close(got, hf_row(proc, output or [11], logits[0]), msg=str(output))


def test_bad_word_prefix_in_prompt_does_not_block():
    logits = rand_logits(1)
    st = state(prompt=[6], output=[], bad_words_token_ids=[[6, 7]])
    torch.testing.assert_close(apply_logits_processing(logits.clone(), [st]), logits)


def test_logit_bias_matches_transformers_sequence_bias():
    logits = rand_logits(1)
    bias = {3: 2.5, 17: -100.0, 30: 0.25}
    proc = hf.SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()])
    got = apply_logits_processing(logits.clone(), [state(logit_bias=bias)])[0]
    torch.testing.assert_close(got, hf_row(proc, [1, 2, 3], logits[0]))


def test_allowed_token_ids_mask_every_other_token():
    logits = rand_logits(2)
    got = apply_logits_processing(logits.clone(), [state(allowed_token_ids=[4, 9]), state()])
    assert torch.isfinite(got[0]).nonzero().view(-1).tolist() == [4, 9]
    torch.testing.assert_close(got[1], logits[1])


def test_user_logits_processor_is_resolved_by_import_path_and_applied(tmp_path, monkeypatch):
    (tmp_path / "my_procs.py").write_text(
        "def only_after_output(output_token_ids, logits):\n"
        "    logits[len(output_token_ids)] += 1000.0\n"
        "    return logits\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    states = [state(temperature=0.0, output=[1, 1, 1], logits_processors=["my_procs:only_after_output"]),
              state(temperature=0.0, output=[1], logits_processors=["my_procs.only_after_output"])]
    out = Sampler(V)(rand_logits(2), states)
    assert out.sampled_token_ids == [3, 1]


def test_unimportable_logits_processor_raises_naming_it():
    with pytest.raises(ValueError, match="no_such_module_xyz:fn"):
        resolve_logits_processor("no_such_module_xyz:fn")


def test_logits_processor_that_raises_fails_only_its_own_request(tmp_path, monkeypatch):
    (tmp_path / "my_bad_procs.py").write_text(
        "def divide_by_zero(output_token_ids, logits):\n"
        "    return logits / (1 // 0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    states = [state(temperature=0.0), state(logits_processors=["my_bad_procs:divide_by_zero"]),
              state(temperature=0.0, logits_processors=["no_such_module_xyz:fn"])]
    logits = rand_logits(3)
    out = Sampler(V)(logits.clone(), states)
    assert states[0].error is None and out.sampled_token_ids[0] == logits[0].argmax().item()
    assert states[1].error == ("logits processor 'my_bad_procs:divide_by_zero' failed: "
                               "ZeroDivisionError: integer division or modulo by zero")
    assert states[2].error.startswith("logits processor 'no_such_module_xyz:fn' failed: ValueError")


@pytest.mark.parametrize("kw", [
    {"allowed_token_ids": [4], "no_repeat_ngram_size": 1},  # 4 was sampled: 4 may not repeat
    {"allowed_token_ids": [4, 7], "bad_words_token_ids": [[4], [7]]},
    {"bad_words_token_ids": [[t] for t in range(V)]},
])
def test_request_whose_constraints_ban_every_token_fails_instead_of_sampling_a_banned_one(kw):
    states = [state(output=[4], **kw), state(temperature=0.0)]
    Sampler(V)(rand_logits(2), states)
    assert states[0].error.startswith("no token is left to sample") and states[1].error is None


# -- sampling filters equal transformers' warpers --------------------------------------------------

def filters(params, omit_unused=False):
    """Filter tensors for apply_sampling_filters; with omit_unused, None for a filter no row uses."""
    t = torch.tensor([p.temperature for p in params])
    k = torch.tensor([p.top_k for p in params], dtype=torch.int32)
    p_ = torch.tensor([p.top_p for p in params])
    m = torch.tensor([p.min_p for p in params])
    if omit_unused:
        k, p_, m = (x if bool((x != off).any()) else None for x, off in ((k, 0), (p_, 1.0), (m, 0.0)))
    return t, k, p_, m


def hf_warp(p, row):
    procs = [hf.TemperatureLogitsWarper(p.temperature)]
    if p.top_k:
        procs.append(hf.TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        procs.append(hf.TopPLogitsWarper(p.top_p))
    if p.min_p > 0.0:
        procs.append(hf.MinPLogitsWarper(p.min_p))
    for proc in procs:
        row = hf_row(proc, [0], row)
    return row


@pytest.mark.parametrize("kw", [dict(top_k=5), dict(top_p=0.6), dict(min_p=0.1),
                                dict(temperature=0.5, top_k=8, top_p=0.9, min_p=0.05)],
                         ids=["top_k", "top_p", "min_p", "chain"])
def test_sampling_filter_matches_transformers(kw):
    logits = rand_logits(1)
    p = SamplingParams(**kw)
    got = apply_sampling_filters(logits.clone(), *filters([p], omit_unused=True))[0]
    torch.testing.assert_close(got, hf_warp(p, logits[0]))


def test_sampling_filters_apply_per_row_settings_in_one_batch():
    logits = rand_logits(4)
    params = [SamplingParams(top_k=3), SamplingParams(top_p=0.5), SamplingParams(temperature=2.0),
              SamplingParams(min_p=0.2, top_k=10)]
    got = apply_sampling_filters(logits.clone(), *filters(params))
    for i, p in enumerate(params):
        torch.testing.assert_close(got[i], hf_warp(p, logits[i]))


LARGE_VOCAB_CASES = {
    # V >= 1024 first decides top-p among the 256 most likely tokens of each row
    "candidates": [dict(top_p=0.9), dict(top_k=50, top_p=0.5), dict(), dict(top_k=7)],
    "top_p_only": [dict(top_p=0.9), dict(), dict(top_p=0.3)],
    "wider_candidates": [dict(top_p=0.9), dict(top_k=300, top_p=0.99)],
    "full_sort": [dict(top_p=0.95, flat=True), dict(top_k=50, top_p=0.5), dict()],
}


@pytest.mark.parametrize("case", LARGE_VOCAB_CASES, ids=list(LARGE_VOCAB_CASES))
def test_large_vocab_top_k_top_p_matches_transformers(case, monkeypatch):
    rows = [dict(kw) for kw in LARGE_VOCAB_CASES[case]]
    logits = rand_logits(len(rows), 4096) * 3
    for i, kw in enumerate(rows):
        if kw.pop("flat", False):
            logits[i] /= 30  # the top 1024 tokens hold too little mass for top_p
    params = [SamplingParams(**kw) for kw in rows]
    sizes = []
    monkeypatch.setattr(sampler_module, "_top_k_top_p_sort",
                        lambda *a, f=sampler_module._top_k_top_p_sort: sizes.append(4096) or f(*a))
    monkeypatch.setattr(sampler_module, "_top_k_top_p_candidates",
                        lambda *a, f=sampler_module._top_k_top_p_candidates: sizes.append(a[3]) or f(*a))
    got = apply_sampling_filters(logits.clone(), *filters(params, omit_unused=True))
    assert sizes == {"candidates": [256], "top_p_only": [256], "wider_candidates": [256, 1024],
                     "full_sort": [256, 1024, 4096]}[case]
    for i, p in enumerate(params):
        torch.testing.assert_close(got[i], hf_warp(p, logits[i]), msg=f"row {i}")


def test_top_k_keeps_ties_at_the_kth_value():
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0]])
    top_k = torch.tensor([2], dtype=torch.int32)
    got = apply_sampling_filters(logits.clone(), torch.ones(1), top_k=top_k)
    assert torch.isfinite(got[0]).tolist() == [False, True, True, True, False]


# -- sampled distributions -----------------------------------------------------------------------

FIXED = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0])


def expected_probs(**kw):
    return torch.softmax(hf_warp(SamplingParams(**kw), FIXED), -1)


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.6), dict(top_k=3),
                                dict(top_p=0.7), dict(min_p=0.2, temperature=1.5)],
                         ids=["t1", "t0.6", "top_k", "top_p", "min_p"])
def test_unseeded_token_frequencies_match_distribution(kw):
    n = 20000
    sampler = Sampler(len(FIXED))
    out = sampler(FIXED.repeat(n, 1), [state(**kw) for _ in range(n)])
    counts = torch.bincount(torch.tensor(out.sampled_token_ids), minlength=len(FIXED))
    ok, stat = chi_square_ok(counts, expected_probs(**kw))
    assert ok, stat


def test_seeded_token_frequencies_match_distribution():
    n = 3000
    kw = dict(temperature=0.8, top_p=0.9)
    out = Sampler(len(FIXED))(FIXED.repeat(n, 1), [state(seed=s, **kw) for s in range(n)])
    counts = torch.bincount(torch.tensor(out.sampled_token_ids), minlength=len(FIXED))
    ok, stat = chi_square_ok(counts, expected_probs(**kw))
    assert ok, stat


def run_steps(states_per_step, target, steps=8):
    """Sample `steps` steps; the batch at step s is states_per_step(s) and contains `target`."""
    sampler = Sampler(V)
    tokens = []
    for s in range(steps):
        batch = states_per_step(s)
        logits = rand_logits(len(batch), seed=100 + s)
        logits[batch.index(target)] = rand_logits(1, seed=s)[0]
        tok = sampler(logits, batch).sampled_token_ids[batch.index(target)]
        target.output_token_ids.append(tok)
        tokens.append(tok)
    return tokens


def test_seed_reproduces_tokens_across_batch_compositions():
    alone_target = state(seed=42, temperature=1.0)
    alone = run_steps(lambda s: [alone_target], alone_target)

    batched_target = state(seed=42, temperature=1.0)
    neighbours = [state(), state(seed=7, top_k=3), state(temperature=0.0), state(seed=42, top_p=0.5)]
    batched = run_steps(lambda s: neighbours[: s % 5] + [batched_target] + neighbours[s % 5:],
                        batched_target)
    assert batched == alone


def sample_rows(target, logits):
    """One token per row of `logits`, each appended to `target`'s output as the worker does."""
    tokens = []
    for row in logits:
        tokens.append(Sampler(V)(row.unsqueeze(0).clone(), [target]).sampled_token_ids[0])
        target.output_token_ids.append(tokens[-1])
    return tokens


def test_rebuilt_state_draws_as_the_one_it_replaces():
    """A preempted request comes back as a new state holding its output so far: it draws on from
    the position it reached, not from the start of its seed's stream."""
    logits = rand_logits(12, seed=9)
    kept = sample_rows(state(seed=42), logits)
    assert sample_rows(state(seed=42, output=kept[:5]), logits[5:]) == kept[5:]


def test_different_seeds_give_different_tokens():
    a, b = state(seed=1), state(seed=2)
    assert run_steps(lambda s: [a], a, steps=20) != run_steps(lambda s: [b], b, steps=20)


def test_random_rows_are_independent_of_greedy_neighbours():
    logits = rand_logits(3)
    out = Sampler(V)(logits.clone(), [state(temperature=0.0), state(seed=5), state(temperature=0.0)])
    assert out.sampled_token_ids[0] == logits[0].argmax().item()
    assert out.sampled_token_ids[2] == logits[2].argmax().item()
    alone = Sampler(V)(logits[1:2].clone(), [state(seed=5)])
    assert out.sampled_token_ids[1] == alone.sampled_token_ids[0]


def test_all_greedy_plain_batch_leaves_logits_untouched():
    logits = rand_logits(3)
    before = logits.clone()
    Sampler(V)(logits, [state(temperature=0.0) for _ in range(3)])
    assert torch.equal(logits, before)


def test_wrong_logits_shape_is_rejected():
    with pytest.raises(ValueError, match="logits must have shape"):
        Sampler(V)(rand_logits(2), [state()])


def test_chi_square_helper_rejects_a_wrong_distribution():
    counts = torch.tensor([5000, 5000, 0, 0, 0, 0, 0, 0])
    assert not chi_square_ok(counts, torch.softmax(FIXED, -1))[0]
    assert chi_square_ok(counts, torch.tensor([0.5, 0.5] + [0.0] * 6))[0]
