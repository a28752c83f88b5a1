#!/usr/bin/env bash
# Creates bench/.venv (git-ignored) with PyTorch + transformers + gguf + peft +
# sentence-transformers from PyPI, for bench/torch_bench.py (the PyTorch side of the speed
# comparison) and the sentence-transformers export test (crates/cli/tests/export.rs).
#
# PyPI has no CPU-only torch wheel for Linux x86_64 (the +cpu builds live on PyTorch's own index,
# which is not reachable here), and the PyPI wheel does not import without its CUDA libraries
# (`pip install --no-deps torch` -> "libcudart.so.13: cannot open shared object file"), so this
# installs the default wheel with its nvidia-* dependencies (~5.6 GB venv, ~40 s here). No GPU is
# needed or used: it runs on CPU (MKL, AVX-512 kernels).
#
# Pinned to the versions that produced ../shared/fixtures (transformers 5.24.0, torch 2.15.0).
# Usage: bash bench/setup_torch.sh [PYTHON]   (default python3; tested with 3.11.7)
set -euo pipefail
cd "$(dirname "$0")"
PY=${1:-python3}
VENV=.venv

TORCH=2.15.0
TRANSFORMERS=5.24.0
GGUF=0.19.0
PEFT=0.21.2
SENTENCE_TRANSFORMERS=6.2.0

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "torch==$TORCH" "transformers==$TRANSFORMERS" "gguf==$GGUF" "peft==$PEFT" \
    "sentence-transformers==$SENTENCE_TRANSFORMERS"

"$VENV/bin/python" - <<'EOF'
import torch, transformers, peft, accelerate, sentence_transformers, importlib.metadata as md
print("python", __import__("sys").version.split()[0])
print("torch", torch.__version__, "| cpu capability", torch.backends.cpu.get_cpu_capability(),
      "| threads", torch.get_num_threads())
print("transformers", transformers.__version__, "| gguf", md.version("gguf"),
      "| peft", peft.__version__, "| accelerate", accelerate.__version__,
      "| tokenizers", md.version("tokenizers"), "| numpy", md.version("numpy"),
      "| sentence-transformers", sentence_transformers.__version__)
EOF
