#!/usr/bin/env bash
# Runs `search-r3 bench model` and the PyTorch/transformers reference on the same GGUF, one
# after the other in the same session, and prints the ratios (ours / PyTorch).
# Needs bench/.venv (bash bench/setup_torch.sh). Not part of CI.
# Usage: bash bench/compare.sh [MODEL_NAME] [REPEATS]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-smollm2}
REPEATS=${2:-5}
OUT=${OUT:-runs/bench}
mkdir -p "$OUT"
cargo build --release -q -p search-r3
BIN=./target/release/search-r3
GGUF=$("$BIN" model fetch "$MODEL")
"$BIN" bench model --model "$MODEL" --repeats "$REPEATS" --json "$OUT/ours.json" >/dev/null
bench/.venv/bin/python bench/torch_bench.py "$GGUF" --repeats "$REPEATS" > "$OUT/torch.json"
python3 - "$OUT/ours.json" "$OUT/torch.json" <<'PY'
import json, sys
ours, ref = (json.load(open(p)) for p in sys.argv[1:3])
m = ours["machine"]
# The ISA line: ratios from machines with different vector extensions are not comparable.
print(f"machine: {m['cpu']}, {m['cores']} cores, {' '.join(m['isa'])}; "
      f"threads: ours {m['threads']}, PyTorch {ref.get('threads')} "
      f"(cpu capability {ref.get('cpu_capability')})")
keys = ["prefill_1x142_tok_s", "prefill_8x128_tok_s", "gen_b1_tok_s", "gen_b16_tok_s",
        "fwd_bwd_lora_4x128_tok_s", "peak_rss_inference_mb", "peak_rss_mb"]
print(f"| metric | search-r3 | PyTorch {ref.get('torch_version','')} | ratio |")
print("|---|---:|---:|---:|")
for k in keys:
    a, b = ours.get(k), ref.get(k)
    r = f"{a / b:.2f}x" if a and b else "n/a"
    print(f"| {k} | {a} | {b} | {r} |")
PY
