"""Drives berth-llm-proxy's /v1/responses with the official `openai` Python
client's Responses API: a plain response, a stream of events, a conversation
continued by previous_response_id, a function-call round, and the errors.

Usage: python responses_check.py BASE_URL API_KEY MODEL
Prints one JSON line of what it saw; exits non-zero on the first failure.
"""

import json
import sys

import openai

from responses_stream import read_stream


def main() -> None:
    base_url, api_key, model = sys.argv[1:4]
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
    seen = {}

    first = client.responses.create(
        model=model, instructions="You are terse.", input="Say hello in five words.",
        max_output_tokens=16, temperature=0,
    )
    assert first.id.startswith("resp_") and first.output_text.strip(), first
    assert first.usage.output_tokens > 0, first.usage
    seen["plain"] = {"text": first.output_text, "status": first.status, "usage": first.usage.model_dump()}

    types, deltas, completed = read_stream(client, model)
    assert "response.output_text.done" in types, types
    seen["stream"] = {"deltas": len(deltas), "text": "".join(deltas), "events": sorted(set(types))}

    # The continuation carries the first exchange: more input tokens.
    second = client.responses.create(
        model=model, previous_response_id=first.id, input="Now say goodbye.",
        max_output_tokens=16, temperature=0,
    )
    assert second.output_text.strip(), second
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens, (first.usage, second.usage)
    seen["continued"] = {"text": second.output_text, "input_tokens": second.usage.input_tokens}

    tools = [{"type": "function", "name": "get_weather", "description": "The current weather in a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
    answered = client.responses.create(model=model, tools=tools, max_output_tokens=24, temperature=0, input=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": "call_01", "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"},
        {"type": "function_call_output", "call_id": "call_01", "output": "Sunny, 21 degrees."},
    ])
    assert answered.output, answered
    seen["tool_round"] = [item.type for item in answered.output]

    try:
        client.responses.create(model=model, input=[
            {"type": "function_call_output", "call_id": "call_missing", "output": "x"}])
        raise AssertionError("a function_call_output without its call was accepted")
    except openai.BadRequestError as error:
        assert error.param == "input[0].call_id", error
        seen["orphan_output"] = error.status_code

    try:
        client.responses.create(model=model, previous_response_id="resp_gone", input="x")
        raise AssertionError("an unknown previous_response_id was accepted")
    except openai.NotFoundError as error:
        assert error.param == "previous_response_id", error
        seen["unknown_previous"] = error.status_code

    print(json.dumps(seen))


if __name__ == "__main__":
    main()
