"""The OpenAI server under schemathesis, fed from its own /openapi.json: bodies that fit the schema
and bodies that break it, and no answer may be a 5xx or hang; /health is still 200 afterwards.
A short, seeded run; `python -m conveyor.tools.fuzz_server` runs a long one."""

from conveyor.frontend.api_server import build_app
from conveyor.tools.fuzz_server import fuzz, serving


def test_openapi_describes_every_request_body_field_and_its_range():
    schema = build_app(None, "served").openapi()
    components = schema["components"]["schemas"]
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        ref = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        body = components[ref.rsplit("/", 1)[1]]
        assert all("description" in field or "$ref" in field for field in body["properties"].values()), path
        assert body["properties"]["model"]["anyOf"][0]["enum"] == ["served"]
    completion = components["CompletionRequest"]["properties"]
    assert (completion["n"]["minimum"], completion["n"]["maximum"]) == (1, 128)
    assert completion["top_p"]["anyOf"][0] == {"type": "number", "exclusiveMinimum": 0, "maximum": 1}


def test_schema_fuzzing_gets_no_server_error_and_leaves_the_server_healthy(llama_dir):
    with serving(llama_dir) as url:
        result = fuzz(url, max_examples=10, request_timeout=20, seed=0, hang_after=150)
    assert result.passed, f"{result.output}\n{result.summary()}"
