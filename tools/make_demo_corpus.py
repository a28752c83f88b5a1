"""Builds data/demo/python-docs.jsonl: the demo corpus of `search-r3 demo`.

Documents are the docstrings of public modules, classes and functions of the CPython 3.11
standard library (text under the PSF License Version 2, which permits redistribution with its
notice; see data/demo/SOURCE.md). Deterministic: same Python version, same output.
Usage: python3 tools/make_demo_corpus.py [OUT]
"""
import importlib, inspect, json, sys

MODULES = [
    "os", "os.path", "shutil", "pathlib", "glob", "tempfile", "io", "csv", "json", "sqlite3",
    "re", "string", "textwrap", "difflib", "datetime", "time", "calendar", "math", "statistics",
    "random", "decimal", "fractions", "itertools", "functools", "collections", "heapq", "bisect",
    "subprocess", "threading", "queue", "socket", "urllib.parse", "http.client", "hashlib",
    "base64", "zipfile", "gzip", "tarfile", "logging", "argparse", "unittest", "pickle", "copy",
    "uuid", "secrets", "struct", "array", "typing", "dataclasses", "enum", "contextlib",
    "inspect", "traceback", "warnings", "platform", "locale", "gettext", "email.message",
    "html", "xml.etree.ElementTree", "configparser", "shlex", "signal", "weakref", "abc",
]
MAX_CHARS = 700

def first_paragraphs(doc):
    doc = inspect.cleandoc(doc or "").strip()
    out, n = [], 0
    for para in doc.split("\n\n"):
        para = " ".join(para.split())
        if not para:
            continue
        out.append(para)
        n += len(para)
        if n >= 200:
            break
    return "\n".join(out)[:MAX_CHARS].strip()

def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "data/demo/python-docs.jsonl"
    docs, seen = [], set()
    for name in MODULES:
        mod = importlib.import_module(name)
        text = first_paragraphs(mod.__doc__)
        if len(text) >= 40:
            docs.append({"_id": name, "title": f"module {name}", "text": text})
        members = []
        for attr in sorted(getattr(mod, "__all__", None) or dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue
            # Skip names a module merely re-exports from an unrelated module.
            home = (getattr(obj, "__module__", None) or name).split(".")[0].lstrip("_")
            if home not in (name.split(".")[0], "posixpath", "io", "thread", "pydecimal"):
                continue
            members.append((attr, obj))
        for attr, obj in members[:12]:
            key = f"{name}.{attr}"
            text = first_paragraphs(getattr(obj, "__doc__", ""))
            if key in seen or len(text) < 40:
                continue
            seen.add(key)
            kind = "class" if inspect.isclass(obj) else "function"
            docs.append({"_id": key, "title": f"{kind} {key}", "text": text})
    with open(out, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    print(f"{len(docs)} documents -> {out} (Python {sys.version.split()[0]})")

main()
