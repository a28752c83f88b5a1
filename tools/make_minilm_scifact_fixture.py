#!/usr/bin/env python3
"""Writes the reference figure the SciFact-subset MiniLM test in crates/cli/tests/eval.rs
compares against: all-MiniLM-L6-v2 through sentence-transformers, cosine top-100, nDCG@10 and
recall@100 as trec_eval computes them (pytrec_eval), on exactly the corpus subset that
`search-r3 eval --max-docs N --seed S` evaluates.

Usage:
    # 1. Let search-r3 pick the subset and list it (DIR/doc_ids.json, corpus order):
    search-r3 eval --dataset ../shared/datasets/scifact --model minilm \\
        --max-docs 1000 --seed 0 --index DIR
    # 2. Reproduce the figure with sentence-transformers on those documents:
    bench/.venv/bin/python tools/make_minilm_scifact_fixture.py MODEL_DIR DIR/doc_ids.json \\
        [--dataset ../shared/datasets/scifact] [--max-docs 1000] [--seed 0] [--out OUT_JSON]

MODEL_DIR is the sentence-transformers directory the Rust code loads (the fetched `minilm`
entry, e.g. ~/.cache/search-r3/models/minilm), so both sides use the very same files. OUT_JSON
defaults to crates/cli/tests/fixtures/minilm_scifact_subset.json. --max-docs and --seed are
recorded in the fixture (the test passes them to `eval`); they must be the ones of step 1.

The subset is read from search-r3's own listing rather than recomputed here because it comes
from Rust's seeded StdRng shuffle (crates/core/src/dataset.rs, `BeirSplit::subsample`), which
Python cannot reproduce simply. The fixture records the SHA-256 of that listing (every id
followed by "\\n", in corpus order) and the test checks it, so a change of the subsampling
shows up as such rather than as a metric drift.

Texts are built as search-r3 builds them: a document is `title + "\\n" + text`
(`Document::full_text`: just the text when the title is blank, just the title when the text
is blank), a query is its text as is; the queries are the split's judged ones (all 300 SciFact
test queries, no --max-queries).

Needs sentence-transformers and pytrec_eval in bench/.venv (after bench/setup_torch.sh):
    bench/.venv/bin/pip install sentence-transformers==6.2.0 pytrec-eval-terrier
(`pytrec_eval` itself builds from source and downloads trec_eval at build time;
pytrec-eval-terrier ships wheels of the same bindings and the same `pytrec_eval` module.)
"""

import argparse
import hashlib
import importlib.metadata as md
import json
import os

import pytrec_eval
import sentence_transformers
import torch
import transformers
from sentence_transformers import SentenceTransformer, util

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(
    HERE, "..", "crates", "cli", "tests", "fixtures", "minilm_scifact_subset.json"
)
DEFAULT_DATASET = os.path.join(HERE, "..", "..", "shared", "datasets", "scifact")


def full_text(title: str, text: str) -> str:
    """crates/core/src/corpus/document.rs, `Document::full_text`."""
    if not title.strip():
        return text
    if not text.strip():
        return title
    return f"{title}\n{text}"


def read_jsonl(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def pytrec_eval_version() -> str:
    for dist in ("pytrec-eval-terrier", "pytrec_eval"):
        try:
            return f"{dist} {md.version(dist)}"
        except md.PackageNotFoundError:
            pass
    return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("model_dir")
    p.add_argument("doc_ids", help="doc_ids.json from `search-r3 eval --model minilm --index DIR`")
    p.add_argument("--dataset", default=DEFAULT_DATASET)
    p.add_argument("--split", default="test")
    p.add_argument("--max-docs", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--depth", type=int, default=100)
    p.add_argument("--out", default=DEFAULT_OUT)
    a = p.parse_args()

    corpus = {str(d["_id"]): d for d in read_jsonl(os.path.join(a.dataset, "corpus.jsonl"))}
    queries = [
        (str(q["_id"]), q["text"]) for q in read_jsonl(os.path.join(a.dataset, "queries.jsonl"))
    ]
    qrels: dict = {}
    with open(os.path.join(a.dataset, "qrels", f"{a.split}.tsv"), encoding="utf-8") as f:
        for n, line in enumerate(f):
            cols = line.rstrip("\n").split("\t")
            if n == 0 and cols[0] == "query-id":
                continue
            qrels.setdefault(cols[0], {})[cols[1]] = int(cols[2])
    # The split's judged queries, in queries.jsonl order (crates/core/src/dataset.rs).
    queries = [(q, t) for q, t in queries if q in qrels]

    with open(a.doc_ids, encoding="utf-8") as f:
        ids = [str(i) for i in json.load(f)]
    order = {d: i for i, d in enumerate(corpus)}
    assert len(ids) == a.max_docs, f"{len(ids)} ids listed, --max-docs {a.max_docs}"
    assert all(d in corpus for d in ids), "an id is not in the corpus"
    assert [order[d] for d in ids] == sorted(order[d] for d in ids), "ids not in corpus order"
    judged = {d for q in qrels.values() for d in q if d in corpus}
    assert judged <= set(ids), "the listing lacks judged documents: not a --max-docs subset"
    ids_sha256 = hashlib.sha256("".join(f"{d}\n" for d in ids).encode()).hexdigest()

    torch.manual_seed(0)
    model = SentenceTransformer(a.model_dir, device="cpu")
    model.eval()
    texts = [full_text(corpus[d].get("title") or "", corpus[d]["text"]) for d in ids]
    doc_emb = model.encode(texts, batch_size=32, convert_to_tensor=True, show_progress_bar=True)
    q_emb = model.encode([t for _, t in queries], batch_size=32, convert_to_tensor=True)
    hits = util.semantic_search(q_emb, doc_emb, top_k=a.depth, score_function=util.cos_sim)
    run = {
        q: {ids[h["corpus_id"]]: float(h["score"]) for h in hs}
        for (q, _), hs in zip(queries, hits)
    }

    measures = {"ndcg_cut.10", "recall.100"}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    assert len(per_query) == len(queries), "every judged query is scored"

    def mean(m: str) -> float:
        return sum(v[m] for v in per_query.values()) / len(per_query)

    data = {
        "description": "all-MiniLM-L6-v2 (sentence-transformers, cosine, top-100) on a SciFact "
        "subset, scored by pytrec_eval; written by tools/make_minilm_scifact_fixture.py",
        "dataset": "scifact",
        "split": a.split,
        "max_docs": a.max_docs,
        "seed": a.seed,
        "queries": len(queries),
        "docs": len(ids),
        "judged_docs": len(judged),
        "doc_ids_sha256": ids_sha256,
        "ndcg@10": mean("ndcg_cut_10"),
        "recall@100": mean("recall_100"),
        "max_seq_length": model.max_seq_length,
        "versions": {
            "sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "pytrec_eval": pytrec_eval_version(),
        },
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    print(f"wrote {a.out}: nDCG@10 {data['ndcg@10']:.4f}, R@100 {data['recall@100']:.4f}")


if __name__ == "__main__":
    main()
