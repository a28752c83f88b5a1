"""The `openai` Python package against `search-r3 serve`, used as users use it.

Usage: python3 openai_compat.py BASE_URL API_KEY

Embeds texts through `client.embeddings.create` (the package asks for base64 by default and
decodes it; `encoding_format="float"` asks for JSON numbers) and checks that the vectors equal
the ones `/embed` returns for the same texts, value for value as f32. Exits non-zero on any
mismatch.
"""
import base64
import json
import struct
import sys
import urllib.request

import openai

base, key = sys.argv[1], sys.argv[2]
texts = ["How do I read a CSV file row by row?", "remove a directory tree", "héllo wörld"]


def f32(xs):
    """JSON numbers as the f32 values they print (Python parses them as f64)."""
    return [struct.unpack("<f", struct.pack("<f", x))[0] for x in xs]


req = urllib.request.Request(
    base + "/embed",
    data=json.dumps({"inputs": texts}).encode(),
    headers={"content-type": "application/json", "authorization": "Bearer " + key},
)
reference = [f32(v) for v in json.load(urllib.request.urlopen(req))]

client = openai.OpenAI(base_url=base + "/v1", api_key=key)
for fmt in (None, "float", "base64"):
    kwargs = {} if fmt is None else {"encoding_format": fmt}
    r = client.embeddings.create(model="smollm2", input=texts, **kwargs)
    if fmt == "base64":
        # Asked for explicitly, the package hands back the raw base64 string.
        raw = [base64.b64decode(d.embedding) for d in r.data]
        got = [list(struct.unpack(f"<{len(b) // 4}f", b)) for b in raw]
    else:
        got = [f32(d.embedding) for d in r.data]
    assert r.model == "smollm2", r.model
    assert [d.index for d in r.data] == [0, 1, 2]
    assert r.usage.prompt_tokens > 0
    for i, (a, b) in enumerate(zip(got, reference)):
        assert len(a) == len(b) == 576, (len(a), len(b))
        diff = max(abs(x - y) for x, y in zip(a, b))
        assert a == b, f"format {fmt}: input {i} differs from /embed by up to {diff}"
    print(f"format {fmt or 'default (base64)'}: {len(got)} vectors equal to /embed")

# A wrong key is refused with the OpenAI error the package raises for 401.
try:
    openai.OpenAI(base_url=base + "/v1", api_key="wrong").embeddings.create(model="m", input="x")
    raise SystemExit("a wrong key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401
    print("wrong key: 401")
