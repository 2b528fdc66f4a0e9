"""The request surface end to end through the engine: n samples, logprobs, prompt logprobs,
stop strings, output kinds, seeds, and per-request errors."""

import asyncio
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from conveyor import AsyncLLM, RequestOutputKind, SamplingParams


@pytest.fixture(scope="module")
def engine(llama_dir):
    llm = AsyncLLM(llama_dir, dtype="float32", num_kv_blocks=512)
    yield llm
    llm.shutdown()


async def final(llm, prompt, params):
    outputs = [out async for out in llm.generate(prompt, params)]
    return outputs[-1], outputs


PROMPT = {"prompt_token_ids": list(range(5, 45))}


async def test_n_samples_share_the_prompt_and_differ(engine):
    # the tiny model is nearly certain of most tokens after this prompt: 32 give samples room to part
    out, _ = await final(engine, PROMPT, SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=32, ignore_eos=True))
    assert out.finished and [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 32 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3


async def test_same_seed_gives_same_tokens_alone_or_in_a_batch(engine):
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=10, ignore_eos=True)
    alone, _ = await final(engine, PROMPT, params)
    others = [final(engine, {"prompt_token_ids": [9] * (i + 3)}, SamplingParams(temperature=1.0, max_tokens=10))
              for i in range(5)]
    together, *_ = await asyncio.gather(final(engine, PROMPT, params), *others)
    assert together[0].outputs[0].token_ids == alone.outputs[0].token_ids
    different, _ = await final(engine, PROMPT, SamplingParams(temperature=1.0, seed=99, max_tokens=10, ignore_eos=True))
    assert different.outputs[0].token_ids != alone.outputs[0].token_ids


async def test_logprobs_and_prompt_logprobs_match_transformers(engine, llama_dir):
    prompt = list(range(5, 45))
    out, _ = await final(engine, {"prompt_token_ids": prompt},
                         SamplingParams(temperature=0, max_tokens=4, logprobs=3, prompt_logprobs=2, ignore_eos=True))
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    ids = prompt + out.outputs[0].token_ids
    with torch.inference_mode():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    completion = out.outputs[0]
    assert len(completion.logprobs) == 4
    for k, (token, position) in enumerate(zip(completion.token_ids, completion.logprobs)):
        row = ref[len(prompt) - 1 + k]
        assert abs(position[token].logprob - float(row[token])) < 1e-4
        top = row.topk(3).indices.tolist()
        assert set(top) <= set(position)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for p in range(1, len(prompt)):
        assert abs(out.prompt_logprobs[p][prompt[p]].logprob - float(ref[p - 1, prompt[p]])) < 1e-4


async def test_delta_outputs_add_up_to_the_cumulative_one(engine):
    params = dict(temperature=0, max_tokens=15, ignore_eos=True)
    cumulative, _ = await final(engine, "Hello there", SamplingParams(**params))
    _, deltas = await final(engine, "Hello there", SamplingParams(output_kind=RequestOutputKind.DELTA, **params))
    assert sum((d.outputs[0].token_ids for d in deltas), []) == cumulative.outputs[0].token_ids
    assert "".join(d.outputs[0].text for d in deltas) == cumulative.outputs[0].text


async def test_final_only_yields_once(engine):
    _, outputs = await final(engine, "Hello", SamplingParams(max_tokens=8, output_kind=RequestOutputKind.FINAL_ONLY))
    assert len(outputs) == 1 and outputs[0].finished


async def test_stop_string_ends_the_text_and_the_request(engine):
    free, _ = await final(engine, "Hello", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    text = free.outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3
    cut, _ = await final(engine, "Hello", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]))
    completion = cut.outputs[0]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop
    assert completion.text == text[: text.index(stop)]
    kept, _ = await final(engine, "Hello", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop],
                                                          include_stop_str_in_output=True))
    assert kept.outputs[0].text == text[: text.index(stop) + len(stop)]
    stats = await engine.get_stats()
    assert stats["num_running"] == 0


async def test_invalid_parameters_fail_alone(engine):
    good = asyncio.create_task(final(engine, "Hello", SamplingParams(temperature=0, max_tokens=5)))
    with pytest.raises(ValueError, match="top_p"):
        await final(engine, "Hello", SamplingParams(top_p=1.5))
    with pytest.raises(ValueError, match="logit_bias"):
        await final(engine, "Hello", SamplingParams(logit_bias={10**7: 1.0}))
    out, _ = await good
    assert out.finished and len(out.outputs[0].token_ids) == 5


@pytest.mark.parametrize("width,length_penalty,early_stopping",
                         [(3, 1.0, False), (2, 0.5, True), (4, 2.0, False), (12, 1.0, False)])
async def test_beam_search_equals_transformers(engine, llama_dir, width, length_penalty, early_stopping):
    prompt = list(range(7, 30))
    params = SamplingParams(n=width, use_beam_search=True, max_tokens=10, length_penalty=length_penalty,
                            early_stopping=early_stopping)
    out, _ = await final(engine, {"prompt_token_ids": prompt}, params)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    ref = model.generate(torch.tensor([prompt]), num_beams=width, num_return_sequences=width, do_sample=False,
                         max_new_tokens=10, length_penalty=length_penalty, early_stopping=early_stopping)
    pad = model.generation_config.pad_token_id
    expected = []
    for row in ref[:, len(prompt):].tolist():
        while row and row[-1] == pad:  # sequences that ended early are padded
            row.pop()
        expected.append(row)
    assert [c.token_ids for c in out.outputs] == expected


async def test_beam_width_past_the_request_limit_is_refused_naming_it(engine):
    params = SamplingParams(n=129, use_beam_search=True, max_tokens=2)
    with pytest.raises(ValueError, match=r"^n must be at most 128 \(request limit max_n\), got 129$"):
        await final(engine, PROMPT, params)


async def test_logits_processor_named_by_import_path_runs_in_the_worker(llama_dir, monkeypatch):
    tests_dir = os.path.dirname(__file__)
    monkeypatch.setenv("PYTHONPATH", tests_dir + os.pathsep + os.environ.get("PYTHONPATH", ""))
    llm = AsyncLLM(llama_dir, dtype="float32", num_kv_blocks=64)
    try:
        params = SamplingParams(max_tokens=6, ignore_eos=True, logits_processors=["user_logits_processors:only_token_42"])
        out, _ = await final(llm, "Hello", params)
        plain, _ = await final(llm, "Hello", SamplingParams(max_tokens=6, ignore_eos=True, temperature=0))
        assert out.outputs[0].token_ids == [42] * 6
        assert plain.outputs[0].token_ids != [42] * 6
    finally:
        llm.shutdown()
