"""Drives blockserve's HTTP API with the official `openai` package and prints
what came back as one JSON object, for tests/http_api.rs to check against
the gRPC API.

    openai_client.py BASE_URL API_KEY MODEL

Every call the test checks is here; nothing is compared in Python.
"""

import json
import sys

import openai
from openai import OpenAI

base_url, api_key, model = sys.argv[1:4]
client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
out = {}


def whole(r):
    c = r.choices[0].model_dump()
    return {"text": c["text"], "token_ids": c["token_ids"], "finish_reason": c["finish_reason"],
            "logprobs": c["logprobs"], "usage": r.usage.model_dump(exclude_none=True) if r.usage else None}


def streamed(chunks):
    text, ids, finish, usage, n = "", [], None, None, 0
    for ch in chunks:
        n += 1
        if ch.usage is not None:
            usage = ch.usage.model_dump(exclude_none=True)
        for c in ch.choices:
            c = c.model_dump()
            text += c.get("text") or (c.get("delta") or {}).get("content") or ""
            ids += c.get("token_ids") or []
            finish = c["finish_reason"] or finish
    return {"text": text, "token_ids": ids, "finish_reason": finish, "usage": usage, "chunks": n}


def error(call):
    try:
        call()
    except openai.APIStatusError as e:
        return {"status": e.status_code, "body": e.response.json(), "retry_after": e.response.headers.get("retry-after")}
    return None


greedy = dict(model=model, prompt="def fibonacci(n):", max_tokens=24, temperature=0)
seeded = dict(model=model, prompt="import os", max_tokens=16, temperature=0.8, seed=7)

raw = client.completions.with_raw_response.create(**greedy)
out["greedy"] = whole(raw.parse()) | {"session": raw.headers.get("x-session-id")}
out["greedy_stream"] = streamed(client.completions.create(**greedy, stream=True, stream_options={"include_usage": True}))
out["seeded"] = whole(client.completions.create(**seeded))
out["seeded_stream"] = streamed(client.completions.create(**seeded, stream=True))
out["ids_prompt"] = whole(client.completions.create(model=model, prompt=[100, 101, 102, 103, 104], max_tokens=8, temperature=0))
out["logprobs"] = whole(client.completions.create(**greedy, logprobs=1))
out["echo"] = whole(client.completions.create(**greedy, echo=True))
out["stop"] = whole(client.completions.create(**greedy, stop=["\n"]))

messages = [{"role": "user", "content": "def add(a, b):"}]
chat = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
out["chat"] = {"text": chat.choices[0].message.content, "token_ids": chat.choices[0].model_dump()["token_ids"],
               "finish_reason": chat.choices[0].finish_reason, "usage": chat.usage.model_dump(exclude_none=True)}
out["chat_stream"] = streamed(client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0, stream=True))
# The same message as a list of text parts.
parts = [{"role": "user", "content": [{"type": "text", "text": "def add("}, {"type": "text", "text": "a, b):"}]}]
chat = client.chat.completions.create(model=model, messages=parts, max_tokens=12, temperature=0)
out["chat_parts"] = {"text": chat.choices[0].message.content, "token_ids": chat.choices[0].model_dump()["token_ids"]}

out["models"] = client.models.list().model_dump()

out["errors"] = {
    "n": error(lambda: client.completions.create(**greedy, n=2)),
    "best_of": error(lambda: client.completions.create(**greedy, best_of=3)),
    "suffix": error(lambda: client.completions.create(**greedy, suffix="x")),
    "presence_penalty": error(lambda: client.completions.create(**greedy, presence_penalty=0.5)),
    "logprobs": error(lambda: client.completions.create(**greedy, logprobs=5)),
    "max_tokens": error(lambda: client.completions.create(**(greedy | {"max_tokens": 100000}))),
    "temperature": error(lambda: client.completions.create(**(greedy | {"temperature": -1}))),
    "unknown_field": error(lambda: client.completions.create(**greedy, extra_body={"guided_json": {}})),
    "model": error(lambda: client.completions.create(**(greedy | {"model": "gpt-4"}))),
    "unauthorized": error(lambda: OpenAI(base_url=base_url, api_key="wrong", max_retries=0).completions.create(**greedy)),
    "deadline": error(lambda: client.completions.create(**(greedy | {"max_tokens": 512}), extra_headers={"x-request-timeout": "0.001"})),
    "image_part": error(lambda: client.chat.completions.create(model=model, max_tokens=4, messages=[
        {"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])),
}
print(json.dumps(out))
