"""Drives tollgate with the official OpenAI and Anthropic Python SDKs.

Usage: sdk_client.py SCENARIO BASE_URL

BASE_URL is tollgate's agent address (http://127.0.0.1:PORT). Prints one JSON
object with what the SDK saw; the Rust test that runs this script checks it
against the mock upstream's hit count and tollgate's metrics.
"""

import json
import sys


def openai_client(base, **headers):
    import openai

    return openai.OpenAI(
        base_url=f"{base}/openai/v1",
        api_key="sk-test-not-a-real-key",
        default_headers=headers,
        max_retries=2,
    )


def anthropic_client(base, **headers):
    import anthropic

    return anthropic.Anthropic(
        base_url=f"{base}/anthropic",
        api_key="sk-ant-test-not-a-real-key",
        default_headers=headers,
        max_retries=2,
    )


def openai_chat(base):
    client = openai_client(base, **{"x-agent-release": "sdk", "x-agent-run-id": "sdk-openai-1"})
    done = client.chat.completions.create(
        model="gpt-4.1-nano", messages=[{"role": "user", "content": "hi"}]
    )
    stream = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    chunks = list(stream)
    return {
        "content": done.choices[0].message.content[:40],
        "prompt_tokens": done.usage.prompt_tokens,
        "stream_chunks": len(chunks),
        "stream_empty_choice_chunks": sum(1 for c in chunks if not c.choices),
        "stream_text": "".join(
            (c.choices[0].delta.content or "") for c in chunks if c.choices
        ),
    }


def anthropic_messages(base):
    client = anthropic_client(base, **{"x-agent-release": "sdk"})
    done = client.messages.create(
        model="claude-sonnet-4-5",
        max_tokens=100,
        messages=[{"role": "user", "content": "hi"}],
    )
    with client.messages.stream(
        model="claude-3-opus-latest",
        max_tokens=100,
        messages=[{"role": "user", "content": "hi"}],
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    return {
        "input_tokens": done.usage.input_tokens,
        "stream_text": text,
        "stream_output_tokens": final.usage.output_tokens,
    }


def budget_refusal(base):
    """A run with a ceiling too small for one call: the SDKs raise and do not retry."""
    out = {}
    headers = {"x-agent-run-id": "sdk-poor-run", "x-agent-budget-usd": "0.000000001"}
    try:
        openai_client(base, **headers).chat.completions.create(
            model="gpt-4.1-nano", messages=[{"role": "user", "content": "hi"}]
        )
        out["openai"] = "no error"
    except Exception as e:  # the SDK's own exception type is what we report
        out["openai"] = {"class": type(e).__name__, "status": getattr(e, "status_code", None)}
    try:
        anthropic_client(base, **headers).messages.create(
            model="claude-sonnet-4-5", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
        )
        out["anthropic"] = "no error"
    except Exception as e:
        out["anthropic"] = {"class": type(e).__name__, "status": getattr(e, "status_code", None)}
    return out


def retry(base):
    """The mock fails the first call with a 500; the SDK retries it."""
    client = openai_client(base, **{"x-agent-run-id": "sdk-retry-run", "x-agent-release": "sdk-retry"})
    done = client.chat.completions.create(
        model="gpt-4.1-nano", messages=[{"role": "user", "content": "hi"}]
    )
    return {"prompt_tokens": done.usage.prompt_tokens}


SCENARIOS = {
    "openai_chat": openai_chat,
    "anthropic_messages": anthropic_messages,
    "budget_refusal": budget_refusal,
    "retry": retry,
}

if __name__ == "__main__":
    scenario, base = sys.argv[1], sys.argv[2]
    print(json.dumps(SCENARIOS[scenario](base)))
