"""Streams through the local stack with the official OpenAI Python SDK; prints one JSON object of what it saw.

Run by tests/local/streaming.test.ts: METERED_BASE_URL is the stack's `<invoke URL>/v1`, METERED_KEY a key, PROMPT
the user message. Streams with `stream_options.include_usage`, then once more with a reset mid-stream.
"""
import json
import os

import openai

client = openai.OpenAI(base_url=os.environ["METERED_BASE_URL"], api_key=os.environ["METERED_KEY"], max_retries=0)
prompt = os.environ["PROMPT"]

content = []
usage = None
request_id = None
with client.chat.completions.with_streaming_response.create(
    model="gpt-4o-mini",
    messages=[{"role": "user", "content": prompt}],
    stream=True,
    stream_options={"include_usage": True},
    extra_body={"mock": {"words": 30}},
) as response:
    request_id = response.headers.get("x-amzn-requestid")
    for chunk in response.parse():
        if chunk.choices and chunk.choices[0].delta.content:
            content.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"})

error = None
partial = []
try:
    for chunk in client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": prompt + " reset"}],
        stream=True,
        extra_body={"mock": {"words": 30, "fail_after_chunks": 5}},
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            partial.append(chunk.choices[0].delta.content)
except openai.APIError as err:
    error = {"class": type(err).__name__, "code": err.code, "message": str(err)}

print(json.dumps({"request_id": request_id, "content": "".join(content), "chunks": len(content), "usage": usage, "partial": "".join(partial), "error": error}))
