"""Drives an OpenAI-compatible endpoint (berth-llm-proxy) with the official
`openai` Python client, the way users' code does, and checks the answers.

Usage: python openai_client_check.py BASE_URL API_KEY MODEL [--chat-only]
(--chat-only: skip the legacy completions endpoint, which Anthropic models lack)
Prints one JSON line of what it saw; exits non-zero on the first failure.
"""

import json
import sys

import openai


def main() -> None:
    base_url, api_key, model = sys.argv[1:4]
    chat_only = "--chat-only" in sys.argv[4:]
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
    seen = {}

    models = [m.id for m in client.models.list()]
    assert model in models, models
    seen["models"] = models

    messages = [{"role": "user", "content": "Say hello in five words."}]
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
    text = reply.choices[0].message.content
    assert text and text.strip(), reply
    assert reply.usage and reply.usage.completion_tokens > 0, reply.usage
    seen["chat"] = {"text": text, "usage": reply.usage.model_dump()}

    pieces = []
    # Chunks carrying usage, which this stream did not ask for (the proxy
    # asks the upstream for it to meter the request, and must take it out).
    usage_chunks = 0
    with client.chat.completions.create(
        model=model, messages=messages, max_tokens=16, temperature=0, stream=True
    ) as stream:
        for chunk in stream:
            usage_chunks += chunk.usage is not None
            for choice in chunk.choices:
                if choice.delta.content:
                    pieces.append(choice.delta.content)
    assert len(pieces) > 1, pieces
    assert usage_chunks == 0, f"{usage_chunks} chunks with usage nobody asked for"
    seen["stream"] = {"chunks": len(pieces), "text": "".join(pieces)}

    if not chat_only:
        completion = client.completions.create(model=model, prompt="The sky is", max_tokens=8, temperature=0)
        assert completion.choices[0].text, completion
        seen["completion"] = completion.choices[0].text

    try:
        client.chat.completions.create(model="no-such-model", messages=messages)
        raise AssertionError("unknown model accepted")
    except openai.NotFoundError as error:
        seen["unknown_model"] = error.status_code

    try:
        openai.OpenAI(base_url=base_url, api_key="sk-wrong", max_retries=0).models.list()
        raise AssertionError("wrong key accepted")
    except openai.AuthenticationError as error:
        seen["wrong_key"] = error.status_code

    print(json.dumps(seen))


if __name__ == "__main__":
    main()
