"""Drives the official OpenAI Python SDK against the local stack; prints one JSON object of what it saw.

Run by tests/local/openai-sdk.test.ts: METERED_BASE_URL is the stack's `<invoke URL>/v1`, METERED_KEYS a JSON map of
customer -> key. Uses the SDK's defaults (max_retries=2), so a 429 without `x-should-retry: false` would be retried.
"""
import json
import os

import openai

base_url = os.environ["METERED_BASE_URL"]
keys = json.loads(os.environ["METERED_KEYS"])
hello = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello from Python"}]}


def failure(call):
    try:
        call()
    except openai.APIStatusError as err:
        return {"class": type(err).__name__, "status": err.status_code, "code": err.code, "type": err.type, "message": str(err)}
    return {"class": None}


seen = {}
client = openai.OpenAI(base_url=base_url, api_key=keys["open"])
seen["content"] = client.chat.completions.create(**hello).choices[0].message.content
seen["wrong_key"] = failure(lambda: openai.OpenAI(base_url=base_url, api_key="w" * 40).chat.completions.create(**hello))
spent = openai.OpenAI(base_url=base_url, api_key=keys["spentpy"])
spent.chat.completions.create(**hello)
seen["quota"] = failure(lambda: spent.chat.completions.create(**hello))
seen["unknown_route"] = failure(lambda: client.images.generate(model="dall-e-3", prompt="x"))
print(json.dumps(seen))
