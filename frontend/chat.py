"""`conveyor chat`: an interactive chat in the terminal, streamed, with the model's chat template.

Each line the user types is a user turn; the model's answer streams back and joins the history,
so later turns see the whole conversation. `/reset` starts afresh, `/exit` (or end of input) quits.
When the conversation outgrows the model's context, the oldest turns are dropped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from collections.abc import Awaitable, Callable
from typing import TextIO

import msgspec

from conveyor.sampling_params import RequestOutputKind, SamplingParams

HELP = "Type a message and press Enter. /reset forgets the conversation, /exit quits."


@dataclasses.dataclass
class Conversation:
    system: str | None = None
    turns: list[dict] = dataclasses.field(default_factory=list)  # user and assistant messages

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns


def chat_prompt(tokenizer, conversation: Conversation) -> dict:
    """The conversation rendered with the tokenizer's chat template, ready for the model's answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the model's tokenizer has no chat template: use `conveyor generate` instead")
    text = tokenizer.apply_chat_template(conversation.messages(), tokenize=False, add_generation_prompt=True)
    return {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}


def fit_context(engine, conversation: Conversation, max_tokens: int) -> dict:
    """The prompt of the conversation, dropping its oldest exchanges until the prompt and the
    answer fit the model's context. The newest user message is always kept."""
    while True:
        prompt = chat_prompt(engine.tokenizer, conversation)
        if len(prompt["prompt_token_ids"]) + max_tokens <= engine.max_model_len or len(conversation.turns) <= 1:
            return prompt
        del conversation.turns[:2]


async def read_line(prompt: str) -> str | None:
    """One line from the terminal, off the event loop; None at end of input."""
    try:
        return await asyncio.to_thread(input, prompt)
    except EOFError:
        return None


async def chat(engine, params: SamplingParams, system: str | None = None,
               read: Callable[[str], Awaitable[str | None]] = read_line, out: TextIO = sys.stdout) -> int:
    """Run the REPL until the user leaves. `engine` is an AsyncLLM; `params` apply to every answer."""
    params = msgspec.structs.replace(params, output_kind=RequestOutputKind.DELTA)
    conversation = Conversation(system)
    out.write(HELP + "\n")
    while (line := await read("> ")) is not None:
        line = line.strip()
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            conversation.turns.clear()
            out.write("(conversation reset)\n")
            continue
        if not line:
            continue
        conversation.turns.append({"role": "user", "content": line})
        prompt = fit_context(engine, conversation, params.max_tokens or 0)
        answer = []
        async for output in engine.generate(prompt, params):
            piece = output.outputs[0].text
            answer.append(piece)
            out.write(piece)
            out.flush()
        out.write("\n")
        conversation.turns.append({"role": "assistant", "content": "".join(answer)})
    return 0
