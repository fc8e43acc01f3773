"""Drives berth-llm-proxy's /v1/messages with the official `anthropic` Python
client, as Anthropic users' code does (anthropic 2.x takes no `temperature`): a plain message, a stream (the SDK's
stream helper and the raw events), a tool-use round, and the errors.

Usage: python anthropic_check.py BASE_URL API_KEY MODEL
Prints one JSON line of what it saw; exits non-zero on the first failure.
"""

import json
import sys

import anthropic


def main() -> None:
    base_url, api_key, model = sys.argv[1:4]
    client = anthropic.Anthropic(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
    seen = {}
    hello = [{"role": "user", "content": "Say hello in five words."}]

    message = client.messages.create(
        model=model, max_tokens=16, system="You are terse.", messages=hello
    )
    text = "".join(block.text for block in message.content if block.type == "text")
    assert text.strip(), message
    assert message.role == "assistant" and message.stop_reason in ("end_turn", "max_tokens"), message
    assert message.usage.output_tokens > 0, message.usage
    seen["plain"] = {"text": text, "stop_reason": message.stop_reason, "usage": message.usage.model_dump()}

    with client.messages.stream(model=model, max_tokens=16, messages=hello) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1, pieces
    assert "".join(block.text for block in final.content if block.type == "text") == "".join(pieces)
    types = [event.type for event in client.messages.create(
        model=model, max_tokens=8, messages=hello, stream=True)]
    assert types[0] == "message_start" and types[-2:] == ["message_delta", "message_stop"], types
    seen["stream"] = {"chunks": len(pieces), "text": "".join(pieces), "events": sorted(set(types))}

    # A tool-use round: the assistant's tool_use and the user's tool_result
    # go to the model, whose answer comes back as text.
    tools = [{
        "name": "get_weather",
        "description": "The current weather in a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }]
    round_trip = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01", "content": "Sunny, 21 degrees."},
        ]},
    ]
    answer = client.messages.create(
        model=model, max_tokens=24, tools=tools, tool_choice={"type": "auto"}, messages=round_trip
    )
    assert answer.content and answer.stop_reason in ("end_turn", "max_tokens", "tool_use"), answer
    seen["tool_round"] = {"blocks": [block.type for block in answer.content], "stop_reason": answer.stop_reason}

    try:
        client.messages.create(model=model, max_tokens=8, messages=[
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_missing", "content": "x"}]}
        ])
        raise AssertionError("a tool_result without its tool_use was accepted")
    except anthropic.BadRequestError as error:
        assert "messages[0].content[0].tool_use_id" in str(error), error
        assert error.body["error"]["type"] == "invalid_request_error", error.body
        seen["orphan_tool_result"] = error.status_code

    try:
        client.messages.create(model="no-such-model", max_tokens=8, messages=hello)
        raise AssertionError("unknown model accepted")
    except anthropic.NotFoundError as error:
        seen["unknown_model"] = error.status_code

    try:
        anthropic.Anthropic(base_url=base_url, api_key="sk-wrong", max_retries=0).messages.create(
            model=model, max_tokens=8, messages=hello)
        raise AssertionError("wrong key accepted")
    except anthropic.AuthenticationError as error:
        seen["wrong_key"] = error.status_code

    print(json.dumps(seen))


if __name__ == "__main__":
    main()
