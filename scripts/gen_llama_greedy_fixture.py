#!/usr/bin/env python3
"""A Q4_K_M GGUF made by llama.cpp's own tools, and llama.cpp's greedy tokens for it.

The acceptance check "a Q4_K_M file generates with the first tokens agreeing with llama.cpp's
greedy on the same file" (crates/model/tests/llama_greedy.rs) needs a file llama.cpp itself
quantized and llama.cpp's continuation on it. This script:

1. builds a tiny random Mixtral with transformers (hidden 256 and expert width 256, so that
   every row is whole 256-value K-quant blocks and `llama-quantize` keeps Q4_K_M's own types
   instead of falling back; 2 layers, 4 heads of 64, 2 KV heads, 4 experts top-2, rope θ 1e6,
   the `fixtures/mixtral` byte-level BPE tokenizer of 512 tokens, BOS added). Weights are
   seeded normals at the scale of a trained layer (linear `N(0, gain²/fan_in)`, gain 2 for
   `lm_head` and the routers, embeddings `N(0, 0.25)`, norms `1 + N(0, 0.01)`, as
   `gen_fixtures.py`), so greedy choices are mostly clear rather than ties;
2. converts it to an f32 GGUF with llama.cpp's `convert_hf_to_gguf.py` (through
   `scripts/convert_gguf.py`, which declares the gpt-2 pre-tokenizer), in a temporary directory;
3. quantizes that with `llama-quantize ... Q4_K_M` (no importance matrix) into
   `fixtures/gguf/mixtral-q4_k_m.gguf`;
4. compiles `scripts/llama_greedy.c` against the same build's libllama and runs it on the file
   (`PROMPT`, `N` tokens, 2 threads) twice: with llama.cpp's defaults (f16 KV cache, flash
   attention) and in its `exact` mode (f32 KV cache, no flash attention), and writes the
   prompt's ids, both runs' tokens, top-2 margins and logits at every step, and the tensor
   types of the file to `fixtures/gguf/mixtral-q4_k_m.llama_greedy.json`.

Usage (from the repository root):
    PY=~/.cache/tandem-peers/pyenv/bin/python
    LL=~/.cache/tandem-peers/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp
    $PY scripts/gen_llama_greedy_fixture.py --llama-cpp $LL --bin ~/.cache/tandem-peers/llbuild/bin
"""

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
GGUF_DIR = os.path.join(ROOT, "fixtures", "gguf")
NAME = "mixtral-q4_k_m"
PROMPT = "The quick brown fox jumps over the lazy dog. Then"
N = 16
THREADS = 2
SEED = 0


def build_checkpoint(out: str, seed: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    cfg = MixtralConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.ndim == 1:
                val = 1.0 + torch.randn(p.shape, generator=g) * 0.01
            elif "embed_tokens" in name:
                val = torch.randn(p.shape, generator=g) * 0.5
            else:
                gain = 2.0 if name.startswith("lm_head") or name.endswith("mlp.gate.weight") else 1.0
                val = torch.randn(p.shape, generator=g) * (gain / math.sqrt(p.shape[-1]))
            p.copy_(val)
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(ROOT, "fixtures", "mixtral", f), os.path.join(out, f))


def tensor_types(path: str, ll: str) -> dict:
    sys.path.insert(0, os.path.join(ll, "gguf-py"))
    import gguf

    r = gguf.GGUFReader(path)
    return {t.name: t.tensor_type.name for t in r.tensors}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", required=True, help="llama.cpp source (convert_hf_to_gguf.py, include/)")
    ap.add_argument("--bin", required=True, help="llama.cpp build's bin/ (llama-quantize, libllama.so)")
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args()
    ll, bin_dir = os.path.abspath(args.llama_cpp), os.path.abspath(args.bin)
    env = dict(os.environ, LD_LIBRARY_PATH=bin_dir)
    out = os.path.join(GGUF_DIR, f"{NAME}.gguf")
    with tempfile.TemporaryDirectory() as tmp:
        hf = os.path.join(tmp, "hf")
        build_checkpoint(hf, args.seed)
        f32 = os.path.join(tmp, "f32.gguf")
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "convert_gguf.py"), ll, hf,
                        "--outtype", "f32", "--outfile", f32], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run([os.path.join(bin_dir, "llama-quantize"), f32, out, "Q4_K_M", str(THREADS)],
                       check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        exe = os.path.join(tmp, "llama_greedy")
        subprocess.run(["cc", "-O2", "-I" + os.path.join(ll, "include"),
                        "-I" + os.path.join(ll, "ggml", "include"),
                        os.path.join(ROOT, "scripts", "llama_greedy.c"), "-L" + bin_dir, "-lllama",
                        "-o", exe], check=True)
        runs = {}
        for mode in ("default", "exact"):
            cmd = [exe, out, str(N), str(THREADS), PROMPT] + (["exact"] if mode == "exact" else [])
            run = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
            runs[mode] = json.loads(run.stdout)
    res = runs["default"]
    assert runs["exact"]["prompt_ids"] == res["prompt_ids"]
    types = tensor_types(out, ll)
    doc = {
        "source": "llama-quantize Q4_K_M of a transformers Mixtral (scripts/gen_llama_greedy_fixture.py); "
                  "llama.cpp greedy via scripts/llama_greedy.c",
        "seed": args.seed,
        "prompt": PROMPT,
        "prompt_ids": res["prompt_ids"],
        "n_threads": THREADS,
        "tensor_types": types,
    }
    for mode, r in runs.items():
        doc[mode] = {k: r[k] for k in ("greedy", "top2_margins", "logits", "kv_cache", "flash_attn")}
    with open(os.path.join(GGUF_DIR, f"{NAME}.llama_greedy.json"), "w") as f:
        # Lists of numbers on one line each (a logit row is 512 numbers).
        text = json.dumps(doc, indent=1, sort_keys=True)
        text = re.sub(r"\[\s*([-0-9.eE+,\s]+?)\s*\]",
                      lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
        f.write(text + "\n")
    kinds = sorted(set(types.values()))
    print(f"{out}: {os.path.getsize(out)} bytes, types {kinds}", file=sys.stderr)
    for mode, r in runs.items():
        print(f"{mode}: greedy {r['greedy']}", file=sys.stderr)
        print(f"{mode}: margins {r['top2_margins']}", file=sys.stderr)


if __name__ == "__main__":
    main()
