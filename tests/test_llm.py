"""The offline `LLM` API: batches in input order, exact greedy outputs, chat templates, calls from
inside a running event loop, and one output built per request rather than one per step."""

import asyncio
import os
import subprocess
import sys

import pytest

from conveyor import LLM, RequestOutputKind, SamplingParams
from reference import hf_greedy, make_prompts

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def llm(llama_dir):
    with LLM(llama_dir, dtype="float32", num_kv_blocks=256) as llm:
        yield llm


def test_generate_returns_each_prompts_greedy_output_in_order(llm, llama_dir):
    prompts = make_prompts(llm.tokenizer.vocab_size, lens=(3, 40, 9))
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    expected = hf_greedy(llama_dir, prompts, MAX_TOKENS)
    assert [out.prompt_token_ids for out in outputs] == prompts
    assert [out.outputs[0].token_ids for out in outputs] == [tokens for tokens, _ in expected]
    for out in outputs:
        assert out.finished and out.outputs[0].finish_reason == "length"
        # an incomplete UTF-8 character at the end is held back (the detokenizer's contract)
        assert out.outputs[0].text == llm.tokenizer.decode(out.outputs[0].token_ids).rstrip("\ufffd")


def test_generate_takes_one_sampling_params_per_prompt(llm):
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (2, 7)]
    outputs = llm.generate(["one prompt", "another prompt"], params, use_tqdm=False)
    assert [len(out.outputs[0].token_ids) for out in outputs] == [2, 7]
    with pytest.raises(ValueError, match=r"one per prompt \(2\), got 3"):
        llm.generate(["one prompt", "another prompt"], params + params[:1], use_tqdm=False)


def test_prompt_dicts_carry_a_cache_salt_that_scopes_the_prefix_cache(llm):
    (prompt,) = make_prompts(llm.tokenizer.vocab_size, lens=(40,), seed=13)
    params = SamplingParams(temperature=0.0, max_tokens=1)
    cached = [llm.generate({"prompt_token_ids": prompt, "cache_salt": salt}, params, use_tqdm=False)[0]
              .num_cached_tokens for salt in ("a", "b", "a")]
    assert cached == [0, 0, 32]


def test_offline_requests_build_only_their_final_output(llm, monkeypatch):
    """Cumulative outputs (the default kind) would copy every token so far, each step; offline
    callers only get the last one, so no other is built. The caller's params stay as they were."""
    processor = llm.engine.output_processor
    built = []
    make_output = processor._make_output

    def counting(*args, **kwargs):
        output = make_output(*args, **kwargs)
        if output is not None:
            built.append(output.request_id)
        return output

    monkeypatch.setattr(processor, "_make_output", counting)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate(["a", "b", "c"], params, use_tqdm=False)
    assert all(len(out.outputs[0].token_ids) == MAX_TOKENS for out in outputs)
    assert sorted(built) == sorted(out.request_id for out in outputs)
    assert params.output_kind == RequestOutputKind.CUMULATIVE


def test_n_samples_offline_come_back_together(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=6, ignore_eos=True)
    (out,) = llm.generate("shared prompt", params, use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 6 for c in out.outputs)


def test_chat_applies_the_models_chat_template(llm):
    conversation = [{"role": "user", "content": "hello there"}]
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    (out,) = llm.chat(conversation, params, use_tqdm=False)
    assert out.prompt == llm.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert len(out.outputs[0].token_ids) == 3


def test_generate_works_from_inside_a_running_event_loop(llm):
    """A notebook cell runs inside an event loop: the blocking call must not need that loop."""
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

    async def cell():
        return llm.generate("inside a loop", params, use_tqdm=False)

    (out,) = asyncio.run(cell())
    assert len(out.outputs[0].token_ids) == 4


def test_a_cpu_user_never_imports_triton(tmp_path):
    """Triton prints a leak report at exit once imported; the demo's path (build a tiny model,
    generate) must not import it in any process."""
    script = ("import sys\n"
              "from conveyor import LLM, SamplingParams\n"
              "from conveyor.tools.make_tiny_model import make_tiny_model\n"
              f"with LLM(str(make_tiny_model({str(tmp_path)!r}, 'llama')), num_kv_blocks=64) as llm:\n"
              "    llm.generate('Hello', SamplingParams(max_tokens=4), use_tqdm=False)\n"
              "assert 'triton' not in sys.modules, 'the frontend imported triton'\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nanobind" not in result.stderr  # the engine's processes share this stderr
