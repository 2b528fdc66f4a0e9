"""Stream a generation from a tiny model built on the spot (random weights: expect gibberish).

    python -m conveyor.tools.demo ["prompt"]
"""

import asyncio
import sys
import tempfile
import time

from conveyor import AsyncLLM, RequestOutputKind, SamplingParams
from conveyor.tools.make_tiny_model import make_tiny_model


async def main(prompt: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model(f"{tmp}/tiny-llama", "llama")
        start = time.perf_counter()
        async with AsyncLLM(str(model_dir), dtype="float32") as llm:
            print(f"engine up in {time.perf_counter() - start:.1f} s; streaming tokens:\n", flush=True)
            params = SamplingParams(max_tokens=48, temperature=0.8, seed=0, output_kind=RequestOutputKind.DELTA)
            async for out in llm.generate(prompt, params):
                completion = out.outputs[0]
                print(completion.text, end="", flush=True)
            print(f"\n\nfinish_reason={completion.finish_reason}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "Once upon a time"))
