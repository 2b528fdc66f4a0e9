"""AsyncLLM inside your own FastAPI app: the engine starts with the app and stops with it.

    CONVEYOR_MODEL=path/to/hf-model-dir uvicorn fastapi_app:app --port 8001
    python examples/fastapi_app.py path/to/hf-model-dir [--port 8001]

    curl -N localhost:8001/generate -d '{"prompt": "Once upon a time", "max_tokens": 32}'

/generate streams plain text as it is generated; a client that hangs up aborts its request.
"""

import argparse
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from conveyor import AsyncLLM, RequestOutputKind, SamplingParams


class GenerateRequest(BaseModel):
    prompt: str
    max_tokens: int = 64
    temperature: float = 0.8


def create_app(model: str, **engine_args) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.llm = AsyncLLM(model, **engine_args)
        try:
            yield
        finally:
            app.state.llm.shutdown()

    app = FastAPI(lifespan=lifespan)

    @app.post("/generate")
    async def generate(request: GenerateRequest):
        llm: AsyncLLM = app.state.llm
        try:
            params = SamplingParams(max_tokens=request.max_tokens, temperature=request.temperature,
                                    output_kind=RequestOutputKind.DELTA)
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        outputs = llm.generate(request.prompt, params)
        try:
            first = await anext(outputs)  # a bad prompt fails here, before the 200 is sent
        except ValueError as e:
            raise HTTPException(400, str(e)) from None

        async def text():
            yield first.outputs[0].text
            async for out in outputs:  # cancelled when the client leaves: that aborts the request
                yield out.outputs[0].text

        return StreamingResponse(text(), media_type="text/plain")

    @app.get("/health")
    async def health():
        if app.state.llm.is_dead:
            raise HTTPException(503, "engine is dead")
        return {"status": "ok"}

    return app


if __name__ == "__main__":
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=os.environ.get("CONVEYOR_MODEL"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    if not args.model:
        parser.error("give a model directory or set CONVEYOR_MODEL")
    uvicorn.run(create_app(args.model), host=args.host, port=args.port, loop="uvloop")
elif os.environ.get("CONVEYOR_MODEL"):
    app = create_app(os.environ["CONVEYOR_MODEL"])
