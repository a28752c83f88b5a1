"""sentence-transformers, used as a user would, on a directory written by
`search-r3 adapter merge --format sentence-transformers`.

Usage: python st_encode.py MODEL_DIR INPUT.json OUTPUT.json

INPUT holds {"documents": [...], "queries": [...]}. Writes {"documents": vectors of
`encode(documents)`, "queries": vectors of `encode(queries, prompt_name="query")`,
"max_seq_length": ..., "versions": {...}}.
"""
import json
import sys

import sentence_transformers
import torch
import transformers
from sentence_transformers import SentenceTransformer

model_dir, src, dst = sys.argv[1:4]
texts = json.load(open(src))
model = SentenceTransformer(model_dir, device="cpu")
docs = model.encode(texts["documents"], batch_size=8, convert_to_numpy=True)
queries = model.encode(texts["queries"], prompt_name="query", batch_size=8, convert_to_numpy=True)
json.dump(
    {
        "documents": docs.astype("float64").tolist(),
        "queries": queries.astype("float64").tolist(),
        "max_seq_length": model.max_seq_length,
        "versions": {
            "sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    },
    open(dst, "w"),
)
