"""Drives `pollen api` with the official `openai` package; prints one JSON object.

usage: openai_client.py BASE_URL MODEL MAX_TOKENS PROMPTS_JSON

PROMPTS_JSON is a list of [prompt, chat] pairs. For each, greedy text through
chat or plain completions, whole and streamed (with usage in the last chunk).
Then the errors the client sees: an unknown model, a prompt too long, and a
third stream while two are open (the API under test allows two at once).
"""

import json
import sys

import openai

base, model, max_tokens, prompts = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
out = {"models": [m.id for m in client.models.list().data], "cases": [], "errors": {}}


def chat(prompt, stream):
    kw = dict(model=model, messages=[{"role": "user", "content": prompt}],
              max_tokens=max_tokens, temperature=0, seed=1)
    if not stream:
        r = client.chat.completions.create(**kw)
        return r.choices[0].message.content, r.usage.completion_tokens, r.choices[0].finish_reason
    text, usage, finish, chunks = "", None, None, 0
    for c in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        chunks += 1
        if c.usage is not None:
            usage = c.usage.completion_tokens
        if c.choices:
            text += c.choices[0].delta.content or ""
            finish = c.choices[0].finish_reason or finish
    assert chunks > 2, "a stream of %d chunks" % chunks
    return text, usage, finish


def completion(prompt, stream):
    kw = dict(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    if not stream:
        r = client.completions.create(**kw)
        return r.choices[0].text, r.usage.completion_tokens, r.choices[0].finish_reason
    text, usage, finish = "", None, None
    for c in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if c.usage is not None:
            usage = c.usage.completion_tokens
        if c.choices:
            text += c.choices[0].text or ""
            finish = c.choices[0].finish_reason or finish
    return text, usage, finish


for prompt, is_chat in prompts:
    run = chat if is_chat else completion
    case = {"prompt": prompt, "chat": is_chat}
    for mode in ("whole", "stream"):
        text, usage, finish = run(prompt, mode == "stream")
        case[mode] = {"text": text, "completion_tokens": usage, "finish_reason": finish}
    out["cases"].append(case)


def status_of(f):
    try:
        f()
        return 200
    except openai.APIStatusError as e:
        return e.status_code


out["errors"]["unknown_model"] = status_of(lambda: client.chat.completions.create(
    model="no-such-model", messages=[{"role": "user", "content": "hi"}], max_tokens=2))
out["errors"]["too_long"] = status_of(lambda: client.completions.create(
    model=model, prompt="hello " * 9000, max_tokens=2))
out["errors"]["n_2"] = status_of(lambda: client.completions.create(
    model=model, prompt="hello", max_tokens=2, n=2))

# Two streams held open, then a third: the API allows two at once.
held = []
for _ in range(2):
    s = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=200,
                                  temperature=0, stream=True)
    it = iter(s)
    next(it)
    held.append(s)
out["errors"]["busy"] = status_of(lambda: client.completions.create(
    model=model, prompt="hello", max_tokens=2))
for s in held:
    s.close()

print(json.dumps(out))
