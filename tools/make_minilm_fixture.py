#!/usr/bin/env python3
"""Writes the reference embeddings the MiniLM test in crates/baselines compares against.

Usage:
    bench/.venv/bin/python tools/make_minilm_fixture.py MODEL_DIR [OUT_JSON]

MODEL_DIR is the sentence-transformers directory the Rust code loads (the fetched `minilm`
entry, e.g. models/models/minilm with SEARCH_R3_HOME=models); loading the very same files on
both sides means a mismatch can only come from the computation, not from a different
checkpoint. OUT_JSON defaults to crates/baselines/tests/fixtures/minilm_reference.json.

Needs sentence-transformers (pip install sentence-transformers into bench/.venv).
"""

import json
import os
import sys

import sentence_transformers
import torch
import transformers
from sentence_transformers import SentenceTransformer

LONG = " ".join(
    [
        "Alterations of the architecture of cerebral white matter in the developing human",
        "brain can affect cortical development and result in functional disabilities.",
        "A line scan diffusion-weighted magnetic resonance imaging sequence with diffusion",
        "tensor analysis was applied to measure the apparent diffusion coefficient, to",
        "calculate relative anisotropy, and to delineate three-dimensional fiber architecture",
        "in cerebral white matter in preterm (n = 17) and full-term infants (n = 7).",
    ]
    * 6
)

# Chosen to exercise what can differ between two BERT pipelines: a bare short text, a
# scientific claim like SciFact's queries, punctuation the WordPiece pre-tokenizer splits,
# accents and CJK (BERT's normaliser lowercases, strips nothing and spaces CJK characters),
# an emoji (unknown to the vocabulary), a text past max_seq_length (truncation), and the
# empty string (which still encodes as [CLS] [SEP]).
SENTENCES = [
    "Hello world.",
    "ALDH1 expression is associated with poorer prognosis for breast cancer primary tumors.",
    'COVID-19 (SARS-CoV-2) isn\'t: a+b=c?! [1], {2}; 3.5% of "cases" & <tags> -- ok...',
    "Café naïve résumé — 北京大学 연구 Ελληνικά 🧬 DNA-Reparatur über Zellen.",
    LONG,
    "",
]


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    model_dir = sys.argv[1]
    here = os.path.dirname(os.path.abspath(__file__))
    out = (
        sys.argv[2]
        if len(sys.argv) > 2
        else os.path.join(here, "..", "crates", "baselines", "tests", "fixtures", "minilm_reference.json")
    )
    torch.manual_seed(0)
    model = SentenceTransformer(model_dir, device="cpu")
    model.eval()
    # One text per batch so that the reference carries no padding at all; the Rust test
    # checks separately that batching does not change results.
    embeddings = [
        model.encode([s], batch_size=1, convert_to_numpy=True)[0].tolist() for s in SENTENCES
    ]
    # `preprocess` is the name since sentence-transformers 6; `tokenize` before.
    tokenize = getattr(model, "preprocess", None) or model.tokenize
    features = tokenize(SENTENCES)
    token_counts = [int(x) for x in features["attention_mask"].sum(dim=1)]
    untruncated = [len(model.tokenizer(s)["input_ids"]) for s in SENTENCES]
    data = {
        "model_dir": os.path.basename(os.path.normpath(model_dir)),
        "max_seq_length": model.max_seq_length,
        "versions": {
            "sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "cases": [
            {
                "text": s,
                "token_count": n,
                "untruncated_token_count": u,
                "input_ids": features["input_ids"][i][:n].tolist(),
                # 9 significant digits round-trip any f32 exactly.
                "embedding": [float(f"{x:.9g}") for x in e],
            }
            for i, (s, n, u, e) in enumerate(zip(SENTENCES, token_counts, untruncated, embeddings))
        ],
    }
    # One case per line keeps the file small and its diffs readable.
    cases = data.pop("cases")
    head = json.dumps(data, ensure_ascii=False, indent=1)[:-2]
    body = ",\n".join("  " + json.dumps(c, ensure_ascii=False) for c in cases)
    with open(out, "w", encoding="utf-8") as f:
        f.write(f'{head},\n "cases": [\n{body}\n ]\n}}\n')
    print(f"wrote {out}: {len(SENTENCES)} cases, dim {len(embeddings[0])}")


if __name__ == "__main__":
    main()
