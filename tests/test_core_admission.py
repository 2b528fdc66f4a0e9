"""EngineCore.add_request without workers: which requests the core queues, with what output budget,
and which it answers with an error output, in the frontend's words."""

from types import SimpleNamespace

import pytest

from conveyor.config import EngineConfig
from conveyor.engine_core.engine_core import EngineCore
from conveyor.engine_core.scheduler import Scheduler
from conveyor.ipc.messages import EngineCoreRequest
from conveyor.sampling_params import SamplingParams, resolve_max_tokens

MAX_MODEL_LEN = 64


def bare_core(num_blocks: int = 64) -> EngineCore:
    """A core's admission state: a scheduler of blocks of 4 tokens, a vocabulary of 100 tokens."""
    core = EngineCore.__new__(EngineCore)
    core.config = EngineConfig(model="unused", block_size=4)
    core.executor = SimpleNamespace(vocab_size=100, hidden_size=16)
    core.scheduler = Scheduler(core.config, num_blocks, max_model_len=MAX_MODEL_LEN)
    core.num_requests_added = 0
    return core


def request(num_prompt_tokens: int, max_tokens: int | None) -> EngineCoreRequest:
    return EngineCoreRequest("r", [5] * num_prompt_tokens, SamplingParams(max_tokens=max_tokens), 0.0)


def test_max_tokens_none_queues_with_what_max_model_len_leaves():
    core = bare_core()
    assert core.add_request(request(10, None)) is None
    assert core.scheduler.requests["r"].max_tokens == MAX_MODEL_LEN - 10


@pytest.mark.parametrize("num_prompt_tokens,max_tokens", [(0, None), (MAX_MODEL_LEN, None), (10, 60)])
def test_request_beyond_max_model_len_is_an_error_output_in_the_frontends_words(num_prompt_tokens, max_tokens):
    with pytest.raises(ValueError) as refusal:
        resolve_max_tokens(num_prompt_tokens, max_tokens, MAX_MODEL_LEN)
    output = bare_core().add_request(request(num_prompt_tokens, max_tokens))
    assert output.finish_reason == "error" and output.error == str(refusal.value)


def test_request_beyond_the_whole_kv_cache_is_an_error_output():
    output = bare_core(num_blocks=4).add_request(request(10, 10))
    assert output.finish_reason == "error" and "exceed the whole KV cache (16 tokens)" in output.error
