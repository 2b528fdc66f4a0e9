"""Conveyor's demo: a chat answer streamed from a real model, then a batch of prompts at full speed.

    python -m conveyor.tools.demo [MODEL]

MODEL defaults to Conveyor's default model, SmolLM2-135M-Instruct (a 4-bit GGUF file).
"""

import asyncio
import sys
import time

from tqdm.auto import tqdm

from conveyor import AsyncLLM, RequestOutputKind, SamplingParams

QUESTION = "What is the capital of France?"
BATCH = [f"Write one sentence about the number {i}." for i in range(32)]


def chat_prompt(tokenizer, question: str) -> dict:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}


async def stream_answer(llm: AsyncLLM) -> None:
    print(f"> {QUESTION}\n", flush=True)
    params = SamplingParams(temperature=0.0, max_tokens=64, output_kind=RequestOutputKind.DELTA)
    async for out in llm.generate(chat_prompt(llm.tokenizer, QUESTION), params):
        print(out.outputs[0].text, end="", flush=True)
    print("\n")


async def run_batch(llm: AsyncLLM) -> None:
    params = SamplingParams(temperature=0.7, seed=0, max_tokens=48, output_kind=RequestOutputKind.FINAL_ONLY)
    bar = tqdm(total=len(BATCH), desc=f"{len(BATCH)} prompts at once", unit="req")
    tokens = 0

    async def one(i: int, question: str) -> None:
        nonlocal tokens
        async for out in llm.generate(chat_prompt(llm.tokenizer, question), params, request_id=f"batch-{i}"):
            tokens += len(out.outputs[0].token_ids)
        bar.update()

    start = time.perf_counter()
    await asyncio.gather(*(one(i, q) for i, q in enumerate(BATCH)))
    bar.close()
    elapsed = time.perf_counter() - start
    print(f"{tokens} tokens generated in {elapsed:.1f} s: {tokens / elapsed:.0f} tokens/s")


async def main(model: str | None) -> None:
    start = time.perf_counter()
    async with AsyncLLM(model) as llm:
        print(f"{llm.config.model} up in {time.perf_counter() - start:.1f} s\n", flush=True)
        await stream_answer(llm)
        await run_batch(llm)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else None))
