"""examples/fastapi_app.py: AsyncLLM started and stopped by a FastAPI app's lifespan, streaming text."""

import importlib.util
import os
import pathlib

import httpx

from procs import engine_pids, wait_until

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "fastapi_app.py"


def load_example():
    spec = importlib.util.spec_from_file_location("fastapi_app_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_example_app_streams_text_and_stops_its_engine_with_the_app(llama_dir):
    app = load_example().create_app(llama_dir, dtype="float32", num_kv_blocks=64, max_model_len=256)
    async with app.router.lifespan_context(app):
        core, workers = engine_pids(app.state.llm)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://example") as http:
            assert (await http.get("/health")).json() == {"status": "ok"}
            response = await http.post("/generate", json={"prompt": "Once upon a time", "max_tokens": 8,
                                                          "temperature": 0.0})
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
            assert response.text
            too_long = await http.post("/generate", json={"prompt": "word " * 300, "max_tokens": 8})
            assert too_long.status_code == 400 and "max_model_len" in too_long.json()["detail"]
    assert wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in [core, *workers]), timeout=10)
