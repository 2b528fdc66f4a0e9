"""Prompt tuning (the seed's p-tuning form): prompt token ids past the vocabulary stand for rows of
the request's `prompt_embedding_table`; the tokens equal transformers' over the prompt embedded by
hand with those rows spliced in, chunked or not, and the prefix cache keys such prompts by their
table. Tables and ids are checked at the door."""

import pytest
import torch
from transformers import AutoConfig

from conveyor import LLM, SamplingParams
from conveyor.frontend.async_llm import embedding_table_of
from conveyor.ipc.messages import EmbeddingTable
from reference import hf_greedy_with_table, make_prompts

MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def hf_config(llama_dir):
    return AutoConfig.from_pretrained(llama_dir)


@pytest.fixture(scope="module")
def case(hf_config):
    """A 40-token prompt whose tokens 0-3 and 20-22 are virtual, and two tables for it."""
    vocab = hf_config.vocab_size
    prompt = make_prompts(vocab, lens=(40,), seed=5)[0]
    prompt[0:4] = [vocab, vocab + 1, vocab + 2, vocab + 3]
    prompt[20:23] = [vocab + 4, vocab + 1, vocab]
    g = torch.Generator().manual_seed(0)
    tables = [torch.randn(5, hf_config.hidden_size, generator=g) for _ in range(2)]
    return prompt, tables


@pytest.fixture(scope="module")
def llm(llama_dir):
    with LLM(llama_dir, dtype="float32", num_kv_blocks=128, max_model_len=128, max_num_batched_tokens=16) as llm:
        yield llm


def run(llm, prompt, table):
    output = llm.generate([{"prompt_token_ids": prompt, "prompt_embedding_table": table}], GREEDY,
                          use_tqdm=False)[0]
    completion = output.outputs[0]
    logprobs = [lps[t].logprob for t, lps in zip(completion.token_ids, completion.logprobs)]
    return completion.token_ids, logprobs, output.num_cached_tokens


def test_virtual_tokens_equal_the_table_rows_spliced_in_by_hand(llm, llama_dir, case):
    prompt, tables = case
    for table in tables:  # 16-token steps: the prompt's chunks hold virtual tokens at their edges
        tokens, logprobs, _ = run(llm, prompt, table)
        reference = hf_greedy_with_table(llama_dir, prompt, table, MAX_TOKENS)
        assert tokens == reference[0]
        assert logprobs == pytest.approx(reference[1], abs=1e-4)


def test_prefix_cache_keys_a_prompt_by_its_table(llm, case):
    prompt, tables = case
    first = run(llm, prompt, tables[0] * 2)
    other = run(llm, prompt, tables[1] * 2)
    again = run(llm, prompt, tables[0] * 2)
    assert first[2] == other[2] == 0 and again[2] == 32
    assert first[0] != other[0] and again[0] == first[0]


def test_ids_past_the_table_and_bad_tables_are_refused(llm, hf_config, case):
    prompt, tables = case
    vocab, hidden = hf_config.vocab_size, hf_config.hidden_size
    with pytest.raises(ValueError, match=rf"prompt_token_ids must be a list of ints in \[0, {vocab + 5}\)"):
        llm.generate([{"prompt_token_ids": prompt + [vocab + 5], "prompt_embedding_table": tables[0]}], GREEDY)
    with pytest.raises(ValueError, match=rf"prompt_token_ids must be a list of ints in \[0, {vocab}\)"):
        llm.generate([{"prompt_token_ids": prompt}], GREEDY)
    with pytest.raises(ValueError, match="prompt_logprobs cannot be asked"):
        llm.generate([{"prompt_token_ids": prompt, "prompt_embedding_table": tables[0]}],
                     SamplingParams(prompt_logprobs=1))
    for table, message in ((torch.zeros(3, hidden + 1), rf"shape \[rows >= 1, {hidden}\], got \[3, {hidden + 1}\]"),
                           (torch.zeros(0, hidden), "shape"), ([[0.0] * hidden], "got list"),
                           (torch.zeros(2, hidden, dtype=torch.int64), "dtype"),
                           (torch.full((2, hidden), float("nan")), "finite")):
        with pytest.raises(ValueError, match=message):
            embedding_table_of({"prompt_token_ids": [1], "prompt_embedding_table": table}, hidden)
    with pytest.raises(ValueError, match="needs prompt_token_ids"):
        embedding_table_of({"prompt": "hi", "prompt_embedding_table": tables[0]}, hidden)


def test_core_refuses_a_table_that_does_not_fit_the_model():
    assert EmbeddingTable("float32", [2, 4], bytes(32)).problem(4) is None
    assert "shape [rows >= 1, 8]" in EmbeddingTable("float32", [2, 4], bytes(32)).problem(8)
    assert "holds 31 bytes" in EmbeddingTable("float32", [2, 4], bytes(31)).problem(4)
    assert "dtype" in EmbeddingTable("int8", [2, 4], bytes(8)).problem(4)
