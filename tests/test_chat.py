"""`conveyor chat`: each line is a user turn, answers stream and join the history."""

import io

import pytest
from transformers import AutoTokenizer

from conveyor import AsyncLLM, SamplingParams
from conveyor.frontend.chat import HELP, Conversation, chat, chat_prompt, fit_context


def scripted(lines):
    """A `read` that types `lines`, then ends the input."""
    pending = list(lines)

    async def read(prompt):
        return pending.pop(0) if pending else None

    return read


@pytest.fixture
async def engine(llama_dir):
    async with AsyncLLM(llama_dir, dtype="float32", max_model_len=128, num_kv_blocks=64) as llm:
        yield llm


@pytest.fixture(scope="module")
def tokenizer_only(llama_dir):
    """What `fit_context` reads of an engine, without starting one."""
    class Engine:
        tokenizer = AutoTokenizer.from_pretrained(llama_dir)
        max_model_len = 128

    return Engine()


class Recorder:
    """Wraps an engine and keeps every prompt sent to it."""

    def __init__(self, engine):
        self.engine, self.prompts, self.answers = engine, [], []
        self.tokenizer, self.max_model_len = engine.tokenizer, engine.max_model_len

    async def generate(self, prompt, params):
        self.prompts.append(prompt["prompt"])
        self.answers.append("")
        async for output in self.engine.generate(prompt, params):
            self.answers[-1] += output.outputs[0].text
            yield output


async def test_each_answer_streams_and_later_turns_see_the_history(engine):
    recorder, out = Recorder(engine), io.StringIO()
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    assert await chat(recorder, params, read=scripted(["hello", "and again"]), out=out) == 0

    first, second = recorder.prompts
    assert "hello" in first and "and again" not in first
    first_answer, second_answer = recorder.answers
    assert first_answer and second.startswith(first + first_answer)  # the whole first exchange, then the new turn
    assert out.getvalue() == f"{HELP}\n{first_answer}\n{second_answer}\n"


async def test_reset_forgets_the_conversation_and_exit_quits(engine):
    recorder = Recorder(engine)
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    await chat(recorder, params, read=scripted(["first", "/reset", "second", "/exit", "never"]), out=io.StringIO())
    assert len(recorder.prompts) == 2
    assert "first" not in recorder.prompts[1]


def test_oldest_exchanges_are_dropped_to_fit_the_context(tokenizer_only):
    engine = tokenizer_only
    conversation = Conversation(turns=[
        {"role": "user", "content": "word " * 30}, {"role": "assistant", "content": "word " * 30},
        {"role": "user", "content": "latest"}])
    prompt = fit_context(engine, conversation, max_tokens=16)
    assert len(prompt["prompt_token_ids"]) + 16 <= engine.max_model_len
    assert conversation.turns == [{"role": "user", "content": "latest"}]


def test_a_tokenizer_without_a_chat_template_is_refused():
    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="no chat template"):
        chat_prompt(NoTemplate(), Conversation(turns=[{"role": "user", "content": "hi"}]))
