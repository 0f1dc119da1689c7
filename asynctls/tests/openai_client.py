"""The official `openai` client against `asynctls serve` (run by tests/serve.rs).

usage: openai_client.py BASE_URL MODEL [EXPECTED_SUBSTRING]

A greedy chat completion, then the same request streamed: the streamed text
must equal the whole one, and both must contain EXPECTED_SUBSTRING when given
(on real weights: "Paris"). Prints "openai client: ok" at the end.
"""

import sys

import openai


def main() -> None:
    base_url, model = sys.argv[1], sys.argv[2]
    expected = sys.argv[3] if len(sys.argv) > 3 else ""
    # No retries: a 429 or 5xx must fail the test, not be hidden.
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    models = [m.id for m in client.models.list().data]
    assert model in models, models
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
    text = whole.choices[0].message.content
    assert whole.choices[0].finish_reason in ("stop", "length"), whole
    assert whole.usage.completion_tokens > 0, whole.usage
    print(f"whole: {text!r} ({whole.choices[0].finish_reason})")
    pieces = []
    finish = None
    chunks = 0
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=24, temperature=0, stream=True
    )
    for chunk in stream:
        chunks += 1
        assert chunks < 1000, "the stream did not end"
        if chunk.choices:
            delta = chunk.choices[0].delta
            if delta.content:
                pieces.append(delta.content)
            if chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
    streamed = "".join(pieces)
    print(f"streamed: {streamed!r} ({finish}, {chunks} chunks)")
    assert streamed == text, (streamed, text)
    assert finish == whole.choices[0].finish_reason, finish
    assert expected in text, (expected, text)
    # An error the client raises as its own exception type.
    try:
        client.chat.completions.create(model=model, messages=messages, n=2)
        raise AssertionError("n=2 was accepted")
    except openai.BadRequestError as e:
        assert "`n`" in str(e), e
    print("openai client: ok")


if __name__ == "__main__":
    main()
