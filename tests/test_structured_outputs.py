"""Structured outputs: constraints checked at the door, compiled once off the event loop, and
enforced token by token in the worker's sampler, so that even a random-weight model's output parses
and matches its JSON schema, regex, choice list or grammar, while the requests beside it run as if
alone."""

import asyncio
import threading
import time

import pytest
import torch
from transformers import AutoTokenizer

from conveyor import LLM, SamplingParams, StructuredOutputsParams
from conveyor.frontend.structured_outputs import GrammarCompiler
from conveyor.gpu_worker.sampler import Sampler, make_sampling_state
from conveyor.gpu_worker.structured_output import GrammarLoader, apply_token_bitmask
from constraints import MAX_TOKENS, all_kinds, assert_meets
from reference import make_prompts

NUM_SCHEMAS = 50


@pytest.fixture(scope="module")
def tokenizer(llama_dir):
    return AutoTokenizer.from_pretrained(llama_dir)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    compiler = GrammarCompiler()
    compiler.bind(tokenizer, len(tokenizer))
    yield compiler
    compiler.shutdown()


@pytest.fixture(scope="module")
def llm(llama_dir):
    with LLM(llama_dir, dtype="float32", num_kv_blocks=256) as llm:
        yield llm


# ---- at the door ----

@pytest.mark.parametrize("fields, needle", [
    ({}, "structured_outputs must be exactly one of"),
    ({"regex": "a", "choice": ["a"]}, "structured_outputs must be exactly one of"),
    ({"json": "{not json"}, "structured_outputs.json must be a JSON schema"),
    ({"json": 3}, "structured_outputs.json must be"),
    ({"regex": ""}, "structured_outputs.regex must be a non-empty string"),
    ({"choice": []}, "structured_outputs.choice must be a non-empty list"),
    ({"choice": ["a", 1]}, "structured_outputs.choice must be a non-empty list"),
    ({"json_object": False}, "structured_outputs must be exactly one of"),
])
def test_a_malformed_constraint_is_a_value_error_naming_its_field(fields, needle):
    with pytest.raises(ValueError, match=needle):
        StructuredOutputsParams(**fields)


def test_beam_search_refuses_a_constraint():
    with pytest.raises(ValueError, match="use_beam_search must be False with structured_outputs"):
        SamplingParams(use_beam_search=True, n=2, structured_outputs=StructuredOutputsParams(regex="a"))


@pytest.mark.parametrize("fields, needle", [
    ({"regex": "a(b"}, "structured_outputs.regex cannot be compiled"),
    ({"json": {"type": "no-such-type"}}, "structured_outputs.json cannot be compiled"),
    ({"grammar": "root ::= undefined_rule"}, "structured_outputs.grammar cannot be compiled"),
])
def test_a_constraint_that_cannot_compile_is_a_value_error_naming_its_field(compiler, fields, needle):
    with pytest.raises(ValueError, match=needle):
        asyncio.run(compiler.compile(StructuredOutputsParams(**fields)))


def test_equal_constraints_compile_once(compiler):
    calls = []
    compile_ = compiler._compile
    compiler._compile = lambda *args: calls.append(args) or compile_(*args)
    try:
        schema = {"type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}}}
        first = asyncio.run(compiler.compile(StructuredOutputsParams(json=schema)))
        text = '{"properties": {"a": {"type": "integer"}}, "required": ["a"], "type": "object"}'
        again = asyncio.run(compiler.compile(StructuredOutputsParams(json=text)))
    finally:
        del compiler._compile
    assert first == again and len(calls) == 1


# ---- in the sampler ----

def loader_of(compiler: GrammarCompiler) -> GrammarLoader:
    """A worker's loader, given the tokenizer's grammar view as the frontend sends it."""
    loader = GrammarLoader()
    loader.set_tokenizer(compiler.tokenizer_json)
    return loader


def test_a_rank_without_the_tokenizers_grammar_view_fails_the_request_alone(tokenizer, compiler):
    vocab = len(tokenizer)
    constraint = StructuredOutputsParams(choice=["yes", "no"])
    params = SamplingParams(structured_outputs=constraint, compiled_grammar=asyncio.run(compiler.compile(constraint)))
    loader = GrammarLoader()
    loader.set_tokenizer("not xgrammar's json")
    states = [make_sampling_state(params, [5], "cpu", seed=0), make_sampling_state(SamplingParams(), [5], "cpu", 0)]
    Sampler(vocab, grammars=loader)(torch.randn(2, vocab), states)
    assert "grammar view is bad" in states[0].error and states[1].error is None

def test_the_torch_bitmask_masks_as_xgrammar_does():
    import xgrammar

    vocab = 70
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, xgrammar.get_bitmask_shape(3, vocab)[1]), dtype=torch.int32)
    expected, got = torch.randn(3, vocab), None
    got = expected.clone()
    xgrammar.apply_token_bitmask_inplace(expected, bitmask, vocab_size=vocab, indices=[0, 2])
    apply_token_bitmask(got, bitmask, [0, 2])
    assert torch.equal(expected, got)


def test_the_sampler_keeps_noise_within_the_grammar(llama_dir, tokenizer, compiler):
    """Random logits, greedy and sampled rows: the tokens spell a match, and the request ends with a stop."""
    vocab = len(tokenizer)
    constraint = StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2,4}")
    compiled = asyncio.run(compiler.compile(constraint))
    sampler = Sampler(vocab, grammars=loader_of(compiler))
    states = [make_sampling_state(SamplingParams(temperature=t, structured_outputs=constraint, eos_token_id=1,
                                                 compiled_grammar=compiled), [5, 6], "cpu", seed=3)
              for t in (0.0, 1.0)]
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        live = [st for st in states if not (st.grammar and st.grammar.is_terminated())]
        if not live:
            break
        tokens = sampler(torch.randn(len(live), vocab, generator=generator) * 5, live).sampled_token_ids
        for st, token in zip(live, tokens):
            st.output_token_ids.append(token)
    for st in states:
        assert st.error is None and st.output_token_ids[-1] == 1
        assert_meets(constraint, tokenizer.decode(st.output_token_ids[:-1]))


def test_a_request_resumed_after_preemption_replays_its_output_into_the_grammar(tokenizer, compiler):
    vocab = len(tokenizer)
    constraint = StructuredOutputsParams(choice=["yes", "no"])
    params = SamplingParams(temperature=0.0, structured_outputs=constraint, eos_token_id=1,
                            compiled_grammar=asyncio.run(compiler.compile(constraint)))
    sampler = Sampler(vocab, grammars=loader_of(compiler))
    state = make_sampling_state(params, [5], "cpu", seed=0)
    state.output_token_ids.extend(tokenizer.encode("ye", add_special_tokens=False))
    token = sampler(torch.randn(1, vocab), [state]).sampled_token_ids[0]
    assert tokenizer.decode(state.output_token_ids + [token]) == "yes"


# ---- end to end ----

def test_every_kind_of_constraint_holds_on_a_random_model(llm):
    """50 generated schemas, the regexes, choices and the grammar, greedy and sampled, n=2."""
    constraints = all_kinds(NUM_SCHEMAS)
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=i, n=1 + i % 3 // 2, max_tokens=MAX_TOKENS,
                             structured_outputs=c) for i, c in enumerate(constraints)]
    outputs = llm.generate(["Answer: "] * len(params), params, use_tqdm=False)
    for constraint, output in zip(constraints, outputs):
        for completion in output.outputs:
            assert completion.finish_reason == "stop", (constraint, completion.text)
            assert_meets(constraint, completion.text)


def test_json_object_composes_with_logit_bias(llm):
    """A bias toward the closing brace ends the object at once (the grammar allows it, then nothing
    but the stop token); against it, the object goes on."""
    brace = llm.tokenizer.convert_tokens_to_ids("}")
    json_object = StructuredOutputsParams(json_object=True)
    params = [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, structured_outputs=json_object,
                             logit_bias={brace: bias}) for bias in (100.0, -100.0)]
    closed, open_ = llm.generate(["x", "x"], params, use_tqdm=False)
    assert closed.outputs[0].text == "{}" and closed.outputs[0].finish_reason == "stop"
    assert open_.outputs[0].text.startswith('{"')


def test_a_complete_grammar_stops_its_request_even_under_ignore_eos(llm):
    choice = StructuredOutputsParams(choice=["left", "right"])
    (out,) = llm.generate("x", SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True,
                                              structured_outputs=choice), use_tqdm=False)
    completion = out.outputs[0]
    assert completion.finish_reason == "stop" and completion.text in ("left", "right")
    assert completion.token_ids[-1] == llm.tokenizer.eos_token_id  # the grammar's end, kept as ignore_eos asks


def test_a_request_that_reaches_max_tokens_mid_object_finishes_with_length(llm):
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 50}}, "required": ["a"]}
    (out,) = llm.generate("x", SamplingParams(temperature=0.0, max_tokens=3,
                                              structured_outputs=StructuredOutputsParams(json=schema)), use_tqdm=False)
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 3


def test_unconstrained_requests_beside_constrained_ones_are_token_exact(llm):
    prompts = [{"prompt_token_ids": p} for p in make_prompts(llm.tokenizer.vocab_size, lens=(5, 17, 9), seed=4)]
    free = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = llm.generate(prompts, free, use_tqdm=False)
    constrained = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                 structured_outputs=StructuredOutputsParams(regex=r"[a-z]{5,9}"))
    mixed = llm.generate([p for prompt in prompts for p in (prompt, prompt)], [free, constrained] * 3,
                         use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[::2]] == [o.outputs[0].token_ids for o in alone]


def test_a_slow_compilation_delays_only_its_own_request(llm):
    """The grammar compiles on its own thread: a request without one is served meanwhile."""
    grammars = llm.engine.grammars
    compile_ = grammars._compile
    release = threading.Event()
    served_meanwhile = []

    def slow(*args):  # compiles only once the free request is done, or gives up after 5 s
        served_meanwhile.append(release.wait(5))
        return compile_(*args)

    grammars._compile = slow
    finished = {}

    async def run(name, params):
        async for out in llm.engine.generate("hi", params):
            pass
        finished[name] = time.monotonic()
        if name == "free":
            release.set()

    async def both():
        await asyncio.gather(
            run("constrained", SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(
                regex=r"slow [0-9]"))),
            run("free", SamplingParams(max_tokens=4, ignore_eos=True)))

    try:
        asyncio.run_coroutine_threadsafe(both(), llm.loop).result(30)
    finally:
        del grammars._compile
    assert served_meanwhile == [True] and finished["free"] < finished["constrained"]


def test_an_invalid_schema_is_refused_before_the_engine(llm):
    with pytest.raises(ValueError, match="structured_outputs.regex cannot be compiled"):
        llm.generate("x", SamplingParams(structured_outputs=StructuredOutputsParams(regex="(")), use_tqdm=False)
    assert llm.generate("x", SamplingParams(max_tokens=2), use_tqdm=False)[0].finished  # the engine goes on
