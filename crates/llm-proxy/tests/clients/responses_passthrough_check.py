"""Drives berth-llm-proxy's /v1/responses, passed through to an upstream that
serves the Responses API itself (LiteLLM's proxy), with the official `openai`
Python client: a plain response, a stream of events, a conversation continued
by previous_response_id, and an upstream's refusal.

Each answer must be the upstream's own, and a translation by berth would fail
each of these checks: berth marks a passed-through answer with
`x-berth-upstream-api: responses`; LiteLLM's response ids are long, encoded
ones where berth's are `resp_` and 32 hex digits; and a previous_response_id
berth never stored is continued (berth's own store would answer 404).

Usage: python responses_passthrough_check.py BASE_URL API_KEY MODEL
Prints one JSON line of what it saw; exits non-zero on the first failure.
"""

import json
import re
import sys

import openai

from responses_stream import read_stream


def upstream_id(response_id: str) -> bool:
    """Whether an id is not one berth makes when it translates."""
    return response_id.startswith("resp_") and not re.fullmatch(r"resp_[0-9a-f]{32}", response_id)


def main() -> None:
    base_url, api_key, model = sys.argv[1:4]
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
    seen = {}

    raw = client.responses.with_raw_response.create(
        model=model, instructions="You are terse.", input="Say hello in five words.",
        max_output_tokens=16, temperature=0,
    )
    first = raw.parse()
    assert raw.headers.get("x-berth-upstream-api") == "responses", dict(raw.headers)
    assert upstream_id(first.id), first.id
    assert first.output_text.strip(), first
    assert first.usage.output_tokens > 0, first.usage
    seen["plain"] = {"id": first.id, "text": first.output_text, "usage": first.usage.model_dump(),
                     "upstream_api": raw.headers.get("x-berth-upstream-api")}

    types, deltas, completed = read_stream(client, model)
    assert upstream_id(completed.id), completed.id
    seen["stream"] = {"deltas": len(deltas), "text": "".join(deltas), "id": completed.id,
                      "events": sorted(set(types))}

    # berth's store never saw this id: only the upstream can continue it.
    second = client.responses.create(
        model=model, previous_response_id=first.id, input="Now say goodbye.",
        max_output_tokens=16, temperature=0,
    )
    assert second.output_text.strip(), second
    assert upstream_id(second.id) and second.id != first.id, (first.id, second.id)
    seen["continued"] = {"id": second.id, "text": second.output_text,
                         "input_tokens": second.usage.input_tokens,
                         "first_input_tokens": first.usage.input_tokens}

    # No input: berth passes it on, LiteLLM refuses it in OpenAI's shape.
    try:
        client.responses.create(model=model, max_output_tokens=8)
        raise AssertionError("a request without input was accepted")
    except openai.BadRequestError as error:
        assert error.param == "input", error
        seen["upstream_refusal"] = {"status": error.status_code, "message": str(error.message)[:200]}

    print(json.dumps(seen))


if __name__ == "__main__":
    main()
