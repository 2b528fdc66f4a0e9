"""Tool calling on /v1/chat/completions: the calls read back from the model's text, whole and
streamed. What `tool_choice` constrains (`protocol.tool_constraint`):

- `required`: the output is a JSON array of {"name": one of the tools, "parameters": its
  arguments}, enforced by its JSON schema; every item is a call.
- a named function: the output is that function's arguments, enforced by its parameters' schema.
- `auto`: the output is free; calls are found in it as Hermes-style
  `<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks (Qwen2, Qwen2.5, Qwen3, Hermes),
  or as Llama 3's JSON, the whole text being `{"name": ..., "parameters": ...}` (calls separated
  by `;`, optionally after `<|python_tag|>`). Only calls of the request's tools count.
- `none`: the output is free and never read as calls.
"""

import json
import re

from conveyor.frontend.protocol import (ChatCompletionRequest, DeltaFunctionCall, DeltaToolCall, FunctionCall,
                                        NamedToolChoice, ToolCall, choice_of, random_id)

HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
HERMES_OPEN = "<tool_call>"
PYTHON_TAG = "<|python_tag|>"


def constrained_calls(request: ChatCompletionRequest, text: str) -> list[ToolCall]:
    """The calls in the text of a `required` or named-function output (empty if it is cut short)."""
    choice = choice_of(request)
    if isinstance(choice, NamedToolChoice):
        try:
            json.loads(text)
        except ValueError:
            return []
        return [ToolCall(function=FunctionCall(name=choice.function.name, arguments=text))]
    try:
        return [ToolCall(function=FunctionCall(name=item["name"], arguments=json.dumps(item["parameters"],
                                                                                     ensure_ascii=False)))
                for item in json.loads(text)]
    except (ValueError, TypeError, KeyError):
        return []


def parse_tool_calls(text: str, tool_names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of an `auto` output: Hermes blocks, else Llama 3's JSON; text with no call
    of a known tool is all content."""
    if HERMES_OPEN in text:
        calls = [call for block in HERMES_CALL.findall(text) if (call := _call_of(block, tool_names))]
        if calls:
            content = text[:text.index(HERMES_OPEN)].strip()
            return content or None, calls
        return text, []
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):].strip()
    if body.startswith("{"):
        calls = [_call_of(part, tool_names) for part in _split_json_objects(body)]
        if calls and all(calls):
            return None, calls
    return text, []


def _call_of(text: str, tool_names: set[str]) -> ToolCall | None:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in tool_names:
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            json.loads(arguments)
        except ValueError:
            return None
    else:
        arguments = json.dumps(arguments, ensure_ascii=False)
    return ToolCall(function=FunctionCall(name=obj["name"], arguments=arguments))


def _split_json_objects(text: str) -> list[str]:
    """`{...}; {...}` (Llama 3's parallel calls) as its objects' texts; one text if it is one."""
    decoder = json.JSONDecoder()
    parts, at = [], 0
    while at < len(text):
        try:
            _, end = decoder.raw_decode(text, at)
        except ValueError:
            return [text]
        parts.append(text[at:end])
        at = end
        while at < len(text) and text[at] in " \t\r\n;":
            at += 1
    return parts


def call_deltas(calls: list[ToolCall], first_index: int = 0) -> list[DeltaToolCall]:
    """Whole calls as stream deltas (each with its id, name and all its arguments)."""
    return [DeltaToolCall(index=first_index + i, id=call.id, type="function",
                          function=DeltaFunctionCall(name=call.function.name, arguments=call.function.arguments))
            for i, call in enumerate(calls)]


class AutoToolStream:
    """Streams an `auto` output: text goes out as content until it may be the start of a call
    (`<tool_call>`, or a first `{` / `<|python_tag|>`), then waits for the end, where the calls
    (or, if none were made, the text held back) go out."""

    def __init__(self, tool_names: set[str]):
        self.tool_names = tool_names
        self.text = ""
        self.sent = 0  # characters of text sent as content
        self.holding = False

    def add(self, delta: str) -> str:
        """The content to send now for `delta`."""
        self.text += delta
        if not self.holding:
            start = self.text.lstrip()
            if self.sent == 0 and (start.startswith("{") or start.startswith(PYTHON_TAG)
                                   or (start and PYTHON_TAG.startswith(start))):
                self.holding = True
            elif HERMES_OPEN in self.text[self.sent:]:
                self.holding = True
                return self._send(self.text.index(HERMES_OPEN, self.sent))
        if self.holding:
            return ""
        return self._send(len(self.text) - _partial_tail(self.text, HERMES_OPEN))

    def finish(self) -> tuple[str, list[ToolCall]]:
        """What is left: (content, calls)."""
        content, calls = parse_tool_calls(self.text, self.tool_names)
        if calls:
            rest = (content or "")[self.sent:] if content and len(content) > self.sent else ""
            return rest, calls
        return self._send(len(self.text)), []

    def _send(self, end: int) -> str:
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out


def _partial_tail(text: str, marker: str) -> int:
    """How many characters at the end of `text` could begin `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ToolCallStream:
    """One streamed choice of a request with tools: each text delta becomes (content, call deltas).
    A named function's arguments stream as they come; `required` and `auto` calls go out whole,
    once the choice's text is complete."""

    def __init__(self, request: ChatCompletionRequest):
        self.request = request
        self.choice = choice_of(request)
        self.auto = AutoToolStream({tool.function.name for tool in request.tools or ()})
        self.text = ""
        self.made_calls = False

    def add(self, delta: str, finished: bool) -> tuple[str | None, list[DeltaToolCall] | None]:
        if self.choice == "none":
            return delta, None
        if isinstance(self.choice, NamedToolChoice):
            opening = not self.text and not self.made_calls
            self.text += delta
            if not opening and not delta:
                return None, None
            self.made_calls = True
            if opening:
                return None, [DeltaToolCall(index=0, id=random_id("call"), type="function", function=DeltaFunctionCall(
                    name=self.choice.function.name, arguments=delta))]
            return None, [DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=delta))]
        if self.choice == "required":
            self.text += delta
            if not finished:
                return None, None
            calls = constrained_calls(self.request, self.text)
            self.made_calls = bool(calls)
            return (None, call_deltas(calls)) if calls else (self.text, None)
        content = self.auto.add(delta)
        if not finished:
            return content or None, None
        rest, calls = self.auto.finish()
        self.made_calls = bool(calls)
        return (content + rest) or None, call_deltas(calls) or None

    def finish_reason(self, reason: str | None) -> str | None:
        return tool_finish_reason(self.request, reason, self.made_calls)


def tool_finish_reason(request: ChatCompletionRequest, reason: str | None, made_calls: bool) -> str | None:
    """OpenAI's: tool_calls where calls ended the choice (not for a named function: stop)."""
    if reason == "stop" and made_calls and not isinstance(choice_of(request), NamedToolChoice):
        return "tool_calls"
    return reason


def message_calls(request: ChatCompletionRequest, text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole choice's text."""
    choice = choice_of(request)
    if choice == "none":
        return text, []
    if choice == "auto":
        return parse_tool_calls(text, {tool.function.name for tool in request.tools or ()})
    calls = constrained_calls(request, text)
    return (None, calls) if calls else (text, [])
