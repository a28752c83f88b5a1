"""Hugging Face's TEI client (`huggingface_hub.InferenceClient`) against `search-r3 serve`, used
as users point it at a text-embeddings-inference endpoint.

Usage: python3 tei_compat.py BASE_URL API_KEY

`feature_extraction` and `sentence_similarity` post to the endpoint's root (`POST /`, TEI's
compatibility route). Checks that the vectors equal the ones `/embed` returns for the same
texts and options (normalize, prompt_name, truncate), and that the similarities are their
cosines. Exits non-zero on any mismatch.
"""
import json
import sys
import urllib.request

import numpy as np
from huggingface_hub import InferenceClient

base, key = sys.argv[1], sys.argv[2]
texts = ["How do I read a CSV file row by row?", "remove a directory tree", "héllo wörld"]


def embed(body):
    req = urllib.request.Request(
        base + "/embed",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "authorization": "Bearer " + key},
    )
    return np.array(json.load(urllib.request.urlopen(req)), dtype=np.float32)


client = InferenceClient(model=base, token=key)
cases = [
    ({}, {}),
    ({"normalize": False}, {"normalize": False}),
    ({"prompt_name": "query"}, {"prompt_name": "query"}),
    ({"truncate": True, "truncation_direction": "left"},
     {"truncate": True, "truncation_direction": "Left"}),
]
for kwargs, options in cases:
    for text in texts:
        got = np.asarray(client.feature_extraction(text, **kwargs), dtype=np.float32)
        want = embed({"inputs": text, **options})
        assert got.shape == want.shape == (1, 576), (got.shape, want.shape)
        assert np.array_equal(got, want), f"{kwargs}: {text!r} differs by {np.abs(got - want).max()}"
    print(f"feature_extraction {kwargs or 'defaults'}: {len(texts)} vectors equal to /embed")

sims = client.sentence_similarity(texts[0], other_sentences=texts[1:] + texts[:1])
unit = embed({"inputs": texts})
want = [float(unit[0] @ unit[i]) for i in (1, 2, 0)]
assert np.allclose(sims, want, atol=1e-5), (sims, want)
print(f"sentence_similarity: {len(sims)} cosines equal to /embed's")

# A wrong key is refused with the HTTP error the package raises for 401.
try:
    InferenceClient(model=base, token="wrong").feature_extraction("x")
    raise SystemExit("a wrong key was accepted")
except Exception as e:  # huggingface_hub's HfHubHTTPError; its module moved between versions
    status = getattr(getattr(e, "response", None), "status_code", None)
    assert status == 401, f"expected 401, got {e!r}"
    print("wrong key: 401")
