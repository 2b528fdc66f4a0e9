"""Structured outputs' cost: a batch where every other request carries a JSON schema against the
same batch unconstrained (output tokens/s), and the time to first token of a request with a schema
never seen before, sent while the batch runs, against an unconstrained one sent alike.

Constrained requests end when their JSON is complete, so throughput counts the tokens generated,
not the requests. The schema asks for a list of long strings, so outputs run to --output-len.

    python -m conveyor.tools.bench_structured [--model DIR|FILE.gguf] [--batch 32] [--output-len 128]
        [--dtype auto] [--out structured.json]
"""

import argparse
import asyncio
import json
import time

from conveyor import AsyncLLM, SamplingParams, StructuredOutputsParams

SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"}}},
          "required": ["items"]}


def prompt(i: int) -> str:
    return f"List {i + 3} facts about the number {i}, as JSON."


async def batch(llm: AsyncLLM, size: int, output_len: int, constrained: bool) -> dict:
    async def one(i: int) -> int:
        constraint = StructuredOutputsParams(json=SCHEMA) if constrained and i % 2 == 0 else None
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True,
                                structured_outputs=constraint)
        async for out in llm.generate(prompt(i), params):
            pass
        return len(out.outputs[0].token_ids)

    start = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i) for i in range(size))))
    wall = time.perf_counter() - start
    return {"constrained_share": 0.5 if constrained else 0.0, "output_tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall}


async def ttft_while_busy(llm: AsyncLLM, size: int, output_len: int, schema_index: int | None) -> float:
    """TTFT of one request sent once a batch of `size` is decoding: with a new schema, or none."""
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    background = [asyncio.ensure_future(_drain(llm.generate(prompt(i), params))) for i in range(size)]
    await asyncio.sleep(1.0)
    constraint = None
    if schema_index is not None:  # a property name never used before: a new grammar to compile
        constraint = StructuredOutputsParams(json={**SCHEMA, "properties": {f"p{schema_index}_{time.time_ns()}":
                                                                            {"type": "integer"}}})
    start = time.perf_counter()
    ttft = None
    async for _ in llm.generate("Give one number as JSON.", SamplingParams(
            temperature=0.0, max_tokens=8, structured_outputs=constraint)):
        ttft = ttft if ttft is not None else time.perf_counter() - start
    await asyncio.gather(*background)
    return ttft


async def _drain(stream) -> None:
    async for _ in stream:
        pass


async def run(args: argparse.Namespace) -> dict:
    engine_args = {"dtype": args.dtype}
    async with AsyncLLM(args.model, **engine_args) as llm:
        await batch(llm, 2, 4, True)  # warm-up: kernels, the tokenizer's grammar view on every rank
        results = {"unconstrained": await batch(llm, args.batch, args.output_len, False),
                   "half_constrained": await batch(llm, args.batch, args.output_len, True),
                   "ttft_unconstrained_s": await ttft_while_busy(llm, args.batch, args.output_len, None),
                   "ttft_new_schema_s": await ttft_while_busy(llm, args.batch, args.output_len, 1)}
    results["throughput_ratio"] = (results["half_constrained"]["tokens_per_s"]
                                   / results["unconstrained"]["tokens_per_s"])
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory or GGUF file (default: the default model)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args(argv)
    results = asyncio.run(run(args))
    for name in ("unconstrained", "half_constrained"):
        r = results[name]
        print(f"{name:>17}: {r['output_tokens']} tokens in {r['wall_s']:.2f} s = {r['tokens_per_s']:.1f} tok/s")
    print(f"throughput, half constrained / unconstrained: {results['throughput_ratio']:.3f}")
    print(f"TTFT while busy: unconstrained {results['ttft_unconstrained_s'] * 1e3:.0f} ms, "
          f"new schema {results['ttft_new_schema_s'] * 1e3:.0f} ms")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
