"""What the Responses check scripts share: one streamed response read whole."""


def read_stream(client, model):
    """Streams a short answer from `model`: its event types in order, its
    text deltas and the response of its `response.completed` event, checked
    to begin with `response.created`, end completed and hold its deltas."""
    deltas, types, completed = [], [], None
    stream = client.responses.create(
        model=model, input="Say hello in five words.", max_output_tokens=16, temperature=0, stream=True
    )
    for event in stream:
        types.append(event.type)
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        elif event.type == "response.completed":
            completed = event.response
    assert types[0] == "response.created" and types[-1] == "response.completed", types
    assert len(deltas) > 1, deltas
    assert completed.output_text == "".join(deltas), (completed, deltas)
    return types, deltas, completed
