"""Tool calling's logic apart from the engine: what each tool_choice constrains, and the calls read
back from a model's text, whole and streamed."""

import json

import pytest

from conveyor.frontend.protocol import ChatCompletionRequest, to_sampling_params
from conveyor.frontend.tool_calls import ToolCallStream, message_calls, parse_tool_calls

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
NAMES = {"get_weather", "get_time"}


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], tools=[WEATHER, TIME], **fields)


def calls_of(calls) -> list[tuple[str, dict]]:
    return [(call.function.name, json.loads(call.function.arguments)) for call in calls]


def test_auto_and_none_leave_the_output_free():
    assert to_sampling_params(chat()).structured_outputs is None
    assert to_sampling_params(chat(tool_choice="none")).structured_outputs is None


def test_a_named_function_constrains_the_output_to_its_parameters():
    params = to_sampling_params(chat(tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    assert params.structured_outputs.json == WEATHER["function"]["parameters"]
    params = to_sampling_params(chat(tool_choice={"type": "function", "function": {"name": "get_time"}}))
    assert params.structured_outputs.json_object


def test_required_constrains_the_output_to_an_array_of_calls_of_the_tools():
    schema = to_sampling_params(chat(tool_choice="required", parallel_tool_calls=False)).structured_outputs.json
    assert schema["minItems"] == 1 and schema["maxItems"] == 1
    assert [item["properties"]["name"]["enum"] for item in schema["items"]["anyOf"]] == [["get_weather"],
                                                                                          ["get_time"]]


@pytest.mark.parametrize("fields, needle", [
    ({"tool_choice": "required", "tools": None}, "tool_choice must be none without tools"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice must name one of the tools"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "must be the only constraint"),
])
def test_tool_choice_refusals_name_the_field(fields, needle):
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER, TIME], **fields}
    with pytest.raises(ValueError, match=needle):
        to_sampling_params(ChatCompletionRequest(**body))


def test_hermes_calls_are_read_with_the_text_before_them_as_content():
    text = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    content, calls = parse_tool_calls(text, NAMES)
    assert content == "Let me look."
    assert calls_of(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {})]


def test_llama3_json_calls_are_read():
    content, calls = parse_tool_calls('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
                                      '{"name": "get_time", "parameters": {}}', NAMES)
    assert content is None and calls_of(calls) == [("get_weather", {"city": "Oslo"}), ("get_time", {})]


@pytest.mark.parametrize("text", [
    "plain words", '{"name": "unknown_tool", "parameters": {}}', '{"answer": 42}',
    "<tool_call>not json</tool_call>", '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
])
def test_text_without_a_call_of_a_known_tool_is_content(text):
    assert parse_tool_calls(text, NAMES) == (text, [])


def stream(request, deltas: list[str]):
    tools = ToolCallStream(request)
    content, calls = "", []
    for i, delta in enumerate(deltas):
        c, d = tools.add(delta, i == len(deltas) - 1)
        content += c or ""
        calls += d or []
    return content, calls, tools.finish_reason("stop")


def test_an_auto_stream_sends_content_until_a_call_then_the_calls_whole():
    deltas = ["Sure", ", checking", " <tool", '_call>{"name": "get_weather", ', '"arguments": {"city": "Rome"}}',
              "</tool_call>"]
    content, calls, reason = stream(chat(), deltas)
    assert content == "Sure, checking "
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("get_weather", {"city": "Rome"})]
    assert calls[0].id and calls[0].index == 0 and reason == "tool_calls"


def test_an_auto_stream_without_a_call_is_all_content():
    content, calls, reason = stream(chat(), ["{", "not a call", "} <tool", "box>"])
    assert content == "{not a call} <toolbox>" and calls == [] and reason == "stop"


def test_a_named_function_streams_its_arguments_as_they_come():
    request = chat(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    content, calls, reason = stream(request, ['{"city"', ': "Lima"}', ""])
    assert content == "" and calls[0].function.name == "get_weather" and calls[0].id
    assert "".join(c.function.arguments for c in calls) == '{"city": "Lima"}'
    assert {c.index for c in calls} == {0} and reason == "stop"


def test_required_calls_go_out_whole_at_the_end():
    request = chat(tool_choice="required")
    content, calls, reason = stream(request, ['[{"name":"get_time",', '"parameters":{}}]'])
    assert content == "" and calls_of(calls) == [("get_time", {})] and reason == "tool_calls"
    assert message_calls(request, '[{"name":"get_time","parameters":{}}]')[0] is None
