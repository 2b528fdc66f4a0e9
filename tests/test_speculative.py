"""Speculative decoding: drafts proposed (n-gram, the caller's), scheduled with the step, verified
in the worker and rolled back where rejected, without changing a single output token."""

import argparse
import asyncio
import json
import os
import pathlib

import pytest
import torch
from prometheus_client import generate_latest
from transformers import AutoConfig

from conveyor import AsyncLLM, SamplingParams, StructuredOutputsParams
from conveyor.config import EngineConfig, RequestLimits, SpeculativeConfig
from conveyor.engine_core.proposer import NgramProposer, Proposer, caller_drafts
from conveyor.engine_core.request import Request
from conveyor.engine_core.scheduler import Scheduler
from conveyor.frontend.args import add_engine_args, engine_args
from conveyor.frontend.metrics import ServerMetrics
from conveyor.gpu_worker.model_runner import ModelRunner
from conveyor.gpu_worker.rejection_sampler import draft_row_states, num_accepted
from conveyor.gpu_worker.sampler import Sampler, make_sampling_state
from conveyor.ipc.messages import ModelRunnerOutput
from conveyor.tools.make_tiny_model import make_tiny_model
from reference import make_prompts

EOS = 2
BS = 4
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 4}


def ngram(k: int = 3, low: int = 1, high: int = 3) -> NgramProposer:
    return NgramProposer(SpeculativeConfig(num_speculative_tokens=k, prompt_lookup_min=low, prompt_lookup_max=high))


# ---- proposers ----

def test_ngram_proposes_what_followed_the_latest_earlier_occurrence():
    tokens = [5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 5, 6, 7]
    assert ngram().propose(tokens, limit=8) == [1, 2, 5]
    assert ngram().propose(tokens, limit=2) == [1, 2]


def test_ngram_prefers_the_longest_matching_suffix():
    tokens = [1, 2, 3, 9, 2, 3, 8, 1, 2, 3]
    assert ngram(high=3).propose(tokens, limit=3) == [9, 2, 3]
    assert ngram(high=2).propose(tokens, limit=3) == [8, 1, 2]


def test_ngram_proposes_nothing_without_a_whole_token_match():
    assert ngram().propose([4, 5, 6, 7], limit=3) == []
    # the bytes of token 1 (01 00 00 00) occur in those of [2**24, 0], across a token boundary
    assert ngram(low=1, high=1).propose([2**24, 0, 7, 1], limit=3) == []


def test_caller_drafts_follow_the_output_until_it_departs():
    request = Request("r", [1, 2], SamplingParams(draft_token_ids=[7, 8, 9]))
    assert caller_drafts(request) == [7, 8, 9]
    request.append_output_token_ids([7])
    assert caller_drafts(request) == [8, 9]
    request.append_output_token_ids([5])
    assert caller_drafts(request) == []


# ---- configuration ----

def test_speculative_config_names_the_methods_it_allows():
    with pytest.raises(ValueError, match="speculative_config.method must be ngram or draft_model, got 'eagle'"):
        EngineConfig(model="unused", speculative_config={"method": "eagle", "model": "d", "num_speculative_tokens": 3})
    with pytest.raises(ValueError, match="num_speculative_tokens must be an int in"):
        EngineConfig(model="unused", speculative_config={"method": "ngram"})
    with pytest.raises(ValueError, match="speculative_config.model must be the draft model's"):
        EngineConfig(model="unused", speculative_config={"method": "draft_model", "num_speculative_tokens": 3})
    with pytest.raises(ValueError, match="speculative_config.model must be None for method ngram"):
        EngineConfig(model="unused", speculative_config={"model": "d", "num_speculative_tokens": 3})
    config = EngineConfig(model="unused", speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                                              "prompt_lookup_max": 5})
    assert (config.speculative_config.prompt_lookup_min, config.speculative_config.prompt_lookup_max) == (5, 5)


def test_command_line_takes_speculative_config_as_json():
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["m", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}'])
    config = EngineConfig(**{**engine_args(args), "model": "unused"})
    assert config.speculative_config == SpeculativeConfig(num_speculative_tokens=2, prompt_lookup_min=1,
                                                          prompt_lookup_max=4)
    with pytest.raises(SystemExit):
        parser.parse_args(["m", "--speculative-config", "[1]"])


def test_caller_drafts_are_bounded_at_the_door():
    with pytest.raises(ValueError, match="draft_token_ids must be a non-empty list"):
        SamplingParams(draft_token_ids=[])
    with pytest.raises(ValueError, match="draft_token_ids must hold at most 32 tokens"):
        SamplingParams(draft_token_ids=[1] * 33).check_limits(RequestLimits())
    with pytest.raises(ValueError, match="draft_token_ids must be None with use_beam_search"):
        SamplingParams(draft_token_ids=[1], use_beam_search=True, n=2)


# ---- the scheduler: slots with the step, rejected ones rolled back ----

def make_scheduler(num_blocks: int = 64, **config) -> Scheduler:
    return Scheduler(EngineConfig(model="unused", block_size=BS, speculative_config=NGRAM, **config), num_blocks,
                     max_model_len=64)


def add(scheduler: Scheduler, prompt: list[int], max_tokens: int = 8) -> Request:
    request = Request("r", prompt, SamplingParams(max_tokens=max_tokens, eos_token_id=EOS), max_tokens=max_tokens)
    scheduler.add_request(request)
    return request


def test_rejected_drafts_give_back_their_slots():
    scheduler = make_scheduler()
    request = add(scheduler, [1, 20, 3, 4, 1, 20, 3])
    step = scheduler.schedule()
    assert step.draft_token_ids == {"r": [4, 1, 20]} and step.num_scheduled_tokens == [10]
    assert scheduler.kv_cache.num_free_blocks == 64 - 3

    (_, out), = scheduler.update_from_output(ModelRunnerOutput(step.step_id, ["r"], [[4, 9]]))
    assert out.new_token_ids == [4, 9] and (out.num_draft_tokens, out.num_accepted_tokens) == (3, 1)
    assert request.num_computed_tokens == 8 and request.num_tokens == 9  # the kept draft is computed, 9 is not
    assert scheduler.kv_cache.num_free_blocks == 64 - 2
    stats = scheduler.stats()
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (1, 3, 1)

    step = scheduler.schedule()  # [..., 4, 9]: 9 occurred nowhere before
    assert step.draft_token_ids == {} and step.num_scheduled_tokens == [1]
    assert step.trimmed_blocks == {"r": 2}  # the workers drop the freed block before taking new ones
    assert step.cached_requests.new_block_ids == [[scheduler.kv_cache.get_block_ids("r")[2]]]


def test_prefix_cache_registers_no_draft():
    scheduler = make_scheduler()
    add(scheduler, [1, 20, 3, 4, 1, 20, 3])
    step = scheduler.schedule()  # 10 slots: 2 full blocks, but only the first holds known tokens
    assert scheduler.kv_cache.num_cached_blocks["r"] == 1
    scheduler.update_from_output(ModelRunnerOutput(step.step_id, ["r"], [[4, 1, 20, 3]]))
    scheduler.schedule()
    assert scheduler.kv_cache.num_cached_blocks["r"] == 2


def test_a_stop_among_kept_drafts_ends_the_request_there():
    scheduler = make_scheduler()
    add(scheduler, [1, 20, 3, 4, 1, 20, 3])
    step = scheduler.schedule()
    (_, out), = scheduler.update_from_output(ModelRunnerOutput(step.step_id, ["r"], [[4, EOS, 20, 5]]))
    assert out.new_token_ids == [4, EOS] and out.finish_reason == "stop"
    assert scheduler.kv_cache.num_free_blocks == 64


def test_drafts_stop_short_of_max_tokens():
    scheduler = make_scheduler()
    add(scheduler, [1, 20, 3, 4, 1, 20, 3], max_tokens=2)
    assert scheduler.schedule().draft_token_ids == {"r": [4]}


def test_a_speculating_request_waits_for_its_step_in_flight():
    scheduler = make_scheduler(async_scheduling=True)
    add(scheduler, [11, 12, 13])
    step = scheduler.schedule()  # no match: no drafts, but the next ones need this step's token
    assert step.draft_token_ids == {}
    assert scheduler.schedule() is None
    scheduler.update_from_output(ModelRunnerOutput(step.step_id, ["r"], [[12]]))
    assert scheduler.schedule().draft_token_ids == {"r": [13, 12]}


# ---- verification ----

def test_verification_keeps_the_longest_agreeing_run():
    assert num_accepted([1, 2, 3], [1, 2, 4, 5]) == 2
    assert num_accepted([1, 2, 3], [1, 2, 3, 5]) == 3
    assert num_accepted([1, 2, 3], [9, 2, 3, 5]) == 0


def test_each_verified_position_samples_as_if_the_drafts_before_it_were_output():
    params = SamplingParams(temperature=1.0, seed=3, repetition_penalty=1.5, frequency_penalty=0.5,
                            min_tokens=3, stop_token_ids=[0], bad_words_token_ids=[[4, 5]],
                            no_repeat_ngram_size=2)
    vocab, out, drafts = 16, [4, 6], [4, 6, 5]
    logits = torch.randn(len(drafts) + 1, vocab, generator=torch.Generator().manual_seed(0))
    state = make_sampling_state(params, [1, 2, 3], "cpu", seed=3)
    state.output_token_ids.extend(out)
    together = Sampler(vocab)(logits.clone(), draft_row_states(state, drafts)).sampled_token_ids
    one_by_one = []
    for j in range(len(drafts) + 1):
        alone = make_sampling_state(params, [1, 2, 3], "cpu", seed=3)
        alone.output_token_ids.extend(out + drafts[:j])
        one_by_one += Sampler(vocab)(logits[j:j + 1].clone(), [alone]).sampled_token_ids
    assert together == one_by_one
    assert state.output_token_ids == out  # the rows' histories are their own


CHI2_999 = {4: 18.467, 5: 20.515}  # chi-square quantile 0.999 by degrees of freedom


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_point_draft_rejection_sampling_is_distributed_as_the_target():
    """Many seeded draws of one position with draft d: d is kept with probability p(d), a rejected
    position follows the residual (p without d, renormalised), and what is emitted follows p."""
    draws, d = 20000, 0
    row = torch.tensor([1.2, 0.3, -0.4, 0.9, 0.0, -1.0])
    p = torch.softmax(row, -1)
    params = SamplingParams(temperature=1.0)
    states = [make_sampling_state(params, [1], "cpu", seed=seed) for seed in range(draws)]
    sampled = Sampler(len(row))(row.repeat(draws, 1), states).sampled_token_ids
    kept = [num_accepted([d], [t]) for t in sampled]
    emitted = torch.bincount(torch.tensor(sampled), minlength=len(row)).double()

    rate, sd = sum(kept) / draws, float((p[d] * (1 - p[d]) / draws).sqrt())
    assert abs(rate - float(p[d])) < 4 * sd
    assert chi_square(emitted, p.double()) < CHI2_999[5]
    residual = torch.cat([p[:d], p[d + 1:]]).double()
    rejected = torch.cat([emitted[:d], emitted[d + 1:]])
    assert chi_square(rejected, residual / residual.sum()) < CHI2_999[4]


# ---- metrics ----

def test_metrics_report_acceptance_rate_and_length():
    metrics = ServerMetrics("m")
    metrics.engine_stats = {"num_drafts": 4, "num_draft_tokens": 12, "num_accepted_tokens": 6}
    text = generate_latest(metrics.registry).decode()
    assert 'conveyor_spec_decode_acceptance_rate{model_name="m"} 0.5' in text
    assert 'conveyor_spec_decode_mean_acceptance_length{model_name="m"} 2.5' in text


# ---- the engine: the same tokens with and without speculation ----

@pytest.fixture(scope="module")
def prompts(llama_dir) -> list[list[int]]:
    """Prompts that repeat themselves, so the n-gram proposer finds drafts."""
    vocab = AutoConfig.from_pretrained(llama_dir).vocab_size
    return [pattern * 3 for pattern in make_prompts(vocab, lens=(5, 9, 14), seed=4)]


def kinds() -> list[SamplingParams]:
    """A request of every kind that must compose with speculation."""
    common = dict(max_tokens=12, ignore_eos=True, logprobs=1)
    return [
        SamplingParams(temperature=0.0, **common),
        SamplingParams(temperature=1.0, seed=5, **common),
        SamplingParams(temperature=0.8, seed=6, top_k=20, repetition_penalty=1.3, presence_penalty=0.5,
                       frequency_penalty=0.3, **common),
        SamplingParams(temperature=0.0, logit_bias={7: 5.0, 9: 3.0}, bad_words=["a b"], **common),
        SamplingParams(temperature=0.0, min_tokens=5, max_tokens=12, stop_token_ids=[7, 9, 11], logprobs=1),
        SamplingParams(temperature=0.0, logits_processors=["user_logits_processors:ban_the_last_token"], **common),
        SamplingParams(temperature=1.0, seed=8, n=2, **common),
        SamplingParams(temperature=0.0, use_beam_search=True, n=2, max_tokens=4, ignore_eos=True),
    ]


async def run(llm: AsyncLLM, prompt, params: SamplingParams):
    async for out in llm.generate({"prompt_token_ids": prompt}, params):
        pass
    return out


async def run_kinds(llm: AsyncLLM, prompts):
    jobs = [run(llm, prompt, params) for prompt in prompts for params in kinds()]
    results = await asyncio.gather(*jobs)
    return [[(c.token_ids, [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs or [])])
             for c in out.outputs] for out in results]


@pytest.fixture(scope="module")
def processors_importable():
    """The workers import the test's logits processor from the tests' folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        yield


@pytest.fixture(scope="module")
def plain(llama_dir, processors_importable):
    llm = AsyncLLM(llama_dir, dtype="float32", num_kv_blocks=256, max_model_len=128)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def expected_kinds(plain, prompts) -> list:
    """Every kind of request without speculation."""
    return asyncio.run(run_kinds(plain, prompts))


async def test_every_kind_of_request_gives_the_same_tokens_with_ngram_speculation(llama_dir, expected_kinds, prompts):
    expected = expected_kinds
    async with AsyncLLM(llama_dir, dtype="float32", num_kv_blocks=256, max_model_len=128,
                        speculative_config=NGRAM) as llm:
        got = await run_kinds(llm, prompts)
        stats = await llm.get_stats()
    assert stats["num_draft_tokens"] > 0 and stats["num_accepted_tokens"] > 0
    for i, (g, e) in enumerate(zip(got, expected)):
        assert [tokens for tokens, _ in g] == [tokens for tokens, _ in e], f"request {i}"
        for (_, got_lps), (_, expected_lps) in zip(g, e):
            assert got_lps == pytest.approx(expected_lps, abs=1e-4), f"request {i}"


async def test_correct_caller_drafts_are_all_kept(plain, prompts):
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    reference = (await run(plain, prompts[0], greedy)).outputs[0].token_ids
    out = await run(plain, prompts[0], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                                                       draft_token_ids=reference + [3, 4]))
    assert out.outputs[0].token_ids == reference
    assert out.metrics.num_draft_tokens == out.metrics.num_accepted_tokens == 15  # one step: 15 drafts + 1


async def test_wrong_caller_drafts_change_nothing(plain, prompts):
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    reference = (await run(plain, prompts[1], greedy)).outputs[0].token_ids
    wrong = [t + 1 for t in reference]
    out = await run(plain, prompts[1], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                                                       draft_token_ids=wrong))
    assert out.outputs[0].token_ids == reference
    assert out.metrics.num_draft_tokens > 0 and out.metrics.num_accepted_tokens == 0


async def test_stop_conditions_apply_to_every_kept_draft(plain, prompts):
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    reference = (await run(plain, prompts[2], greedy)).outputs[0]
    tokens = reference.token_ids
    at = next(i for i in range(3, len(tokens)) if tokens[i] not in tokens[:i])
    stop_id = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop_token_ids=[tokens[at]],
                             draft_token_ids=tokens)
    out = (await run(plain, prompts[2], stop_id)).outputs[0]
    assert out.token_ids == tokens[:at + 1] and out.finish_reason == "stop"

    stop = reference.text.strip()[len(reference.text.strip()) // 2:][:3]
    without = (await run(plain, prompts[2], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                                                           stop=[stop]))).outputs[0]
    with_drafts = (await run(plain, prompts[2], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                                                               stop=[stop], draft_token_ids=tokens))).outputs[0]
    assert without.finish_reason == "stop"
    assert (with_drafts.token_ids, with_drafts.text, with_drafts.finish_reason) == (
        without.token_ids, without.text, without.finish_reason)


# ---- the draft model ----

@pytest.fixture(scope="module")
def other_weights(tmp_path_factory) -> str:
    """The tiny llama's shape and vocabulary, other random weights: a draft that is often wrong."""
    return str(make_tiny_model(tmp_path_factory.mktemp("draft"), "llama", seed=1))


def draft_model(path: str) -> dict:
    return {"method": "draft_model", "model": path, "num_speculative_tokens": 3}


async def test_draft_model_equal_to_the_target_keeps_every_greedy_draft(llama_dir, plain, prompts):
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    expected = [(await run(plain, p, greedy)).outputs[0].token_ids for p in prompts]
    async with AsyncLLM(llama_dir, dtype="float32", num_kv_blocks=256, max_model_len=128,
                        speculative_config=draft_model(llama_dir)) as llm:
        outs = [await run(llm, p, greedy) for p in prompts]
    assert [out.outputs[0].token_ids for out in outs] == expected
    for out in outs:  # the prefill's token, 3 steps of 3 drafts + 1, then 2 drafts + 1: 16 tokens
        assert (out.metrics.num_draft_tokens, out.metrics.num_accepted_tokens) == (11, 11)


async def test_draft_model_with_other_weights_changes_no_token(llama_dir, other_weights, expected_kinds, prompts):
    expected = expected_kinds
    async with AsyncLLM(llama_dir, dtype="float32", num_kv_blocks=256, max_model_len=128,
                        speculative_config=draft_model(other_weights)) as llm:
        got = await run_kinds(llm, prompts)
        stats = await llm.get_stats()
    assert stats["num_draft_tokens"] > stats["num_accepted_tokens"]
    for i, (g, e) in enumerate(zip(got, expected)):
        assert [tokens for tokens, _ in g] == [tokens for tokens, _ in e], f"request {i}"


def test_draft_model_must_share_the_vocabulary(tmp_path, llama_dir):
    config = json.loads((pathlib.Path(llama_dir) / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 1}))
    with pytest.raises(ValueError, match="speculative_config.model must have the target's vocabulary"):
        ModelRunner(EngineConfig(model=llama_dir, dtype="float32", speculative_config=draft_model(str(tmp_path))),
                    torch.device("cpu"))


def test_constrained_requests_never_speculate():
    """A worker's grammar matcher follows its request token by token: no drafts for it, from the
    engine's proposer or from the caller."""
    constraint = StructuredOutputsParams(regex="[ab]+")
    with pytest.raises(ValueError, match="draft_token_ids.*structured_outputs"):
        SamplingParams(draft_token_ids=[1, 2], structured_outputs=constraint)
    proposer = Proposer(SpeculativeConfig(method="ngram", num_speculative_tokens=2))
    request = Request("r", [1, 2, 1, 2], SamplingParams(max_tokens=8, structured_outputs=constraint))
    assert not proposer.speculates(request)
    assert proposer.speculates(Request("s", [1, 2, 1, 2], SamplingParams(max_tokens=8)))
