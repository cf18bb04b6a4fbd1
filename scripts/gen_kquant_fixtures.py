#!/usr/bin/env python3
"""Fixtures for tandem's K-quant and MXFP4 kernels (crates/kernels/src/kquant.rs).

1. `fixtures/gguf/kquant-q4_k_m.gguf`: a tiny Mixtral-layout model (hidden 256, so that rows
   are whole 256-value K-quant blocks), its tensors quantized by llama.cpp's own quantizer
   (`ggml_quantize_chunk` of libggml-base, the function `llama-quantize` calls per tensor,
   through ctypes; no importance matrix) in Q4_K_M's mix: Q6_K for the tensors Q4_K_M gives
   more bits (`output`, `attn_v`, `ffn_down_exps`), Q4_K for the others, except the
   up-projection experts in Q5_K (as `llama-quantize --tensor-type ffn_up_exps=q5_k` would
   do), so one file holds all three K-quants; routers and norms stay F32. The metadata
   (tokenizer, chat template) is mixtral-f32.gguf's, the sizes this model's. Written with
   gguf-py's writer.
2. `fixtures/gguf/kquant-reference.json`: for every K-quant tensor of that file, gguf-py's
   numpy dequantization (`gguf.quants.dequantize`, an implementation independent of tandem's
   and of llama.cpp's C): the FNV-1a 64 hash of its f32 little-endian bytes and a few values
   as f32 bit patterns; plus MXFP4 blocks (gguf-py's quantizer: candle's GGUF reader cannot
   read type 39 yet, so they are raw block bytes, not a GGUF) with their dequantized values.

Usage (a llama.cpp build's libggml-base.so; gguf-py from the same checkout):
    PYTHONPATH=<llama.cpp>/gguf-py python scripts/gen_kquant_fixtures.py \
        [--libggml <llama.cpp build>/bin/libggml-base.so]
"""

import argparse
import ctypes
import json
import os
import sys

import numpy as np
import gguf
from gguf.quants import dequantize, quantize

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
GGUF_DIR = os.path.join(ROOT, "fixtures", "gguf")

HIDDEN, FF, HEADS, KV_HEADS, LAYERS, EXPERTS, USED, VOCAB = 256, 256, 4, 2, 1, 4, 2, 512


def fnv1a64(b: bytes) -> int:
    h = 0xCBF29CE484222325
    for x in b:
        h ^= x
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


# Q4_K_M's mix for this model's tensors (see the module doc); the rest Q4_K.
Q = gguf.GGMLQuantizationType
TYPES = {"output.weight": Q.Q6_K, "attn_v.weight": Q.Q6_K, "ffn_down_exps.weight": Q.Q6_K,
         "ffn_up_exps.weight": Q.Q5_K}


def ggml_quantize(lib: ctypes.CDLL, x: np.ndarray, qtype) -> np.ndarray:
    """llama.cpp's quantizer on the rows of `x` (last axis), no importance matrix."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_per_row = x.shape[-1]
    nrows = x.size // n_per_row
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    dst = np.zeros(nrows * (n_per_row // block) * size, dtype=np.uint8)
    written = lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, dst.ctypes.data, 0, nrows,
                                      n_per_row, None)
    assert written == dst.size, (written, dst.size)
    # gguf-py takes quantized tensors in their byte shape (rows of row-bytes).
    return dst.reshape(x.shape[:-1] + (-1,))


def write_model(path: str, lib: ctypes.CDLL) -> None:
    src = gguf.GGUFReader(os.path.join(GGUF_DIR, "mixtral-f32.gguf"))
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("Mixtral K-quant fixture")
    w.add_block_count(LAYERS)
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_expert_count(EXPERTS)
    w.add_expert_used_count(USED)
    w.add_vocab_size(VOCAB)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    # The tokenizer and chat template of the Mixtral fixture.
    for key, field in src.fields.items():
        if not key.startswith("tokenizer."):
            continue
        types = field.types
        if types[0] == gguf.GGUFValueType.ARRAY:
            w.add_array(key, field.contents())
        elif types[0] == gguf.GGUFValueType.STRING:
            w.add_string(key, field.contents())
        elif types[0] == gguf.GGUFValueType.BOOL:
            w.add_bool(key, field.contents())
        else:
            w.add_uint32(key, field.contents())
    rng = np.random.default_rng(0)

    def lin(out: int, inp: int, gain: float = 1.0) -> np.ndarray:
        x = rng.normal(0.0, gain / np.sqrt(inp), size=(out, inp)).astype(np.float32)
        # A few outliers and exact zeros, as real checkpoints have.
        idx = rng.integers(0, x.size, size=max(1, x.size // 2000))
        x.flat[idx] *= 8.0
        x.flat[rng.integers(0, x.size, size=max(1, x.size // 1000))] = 0.0
        return x

    def add(name: str, x: np.ndarray) -> None:
        base = name.split(".", 2)[-1] if name.startswith("blk.") else name
        if x.ndim == 1 or "ffn_gate_inp" in name:
            w.add_tensor(name, x.astype(np.float32))
            return
        qtype = TYPES.get(base, Q.Q4_K)
        w.add_tensor(name, ggml_quantize(lib, x, qtype), raw_dtype=qtype)

    hd = HIDDEN // HEADS
    add("token_embd.weight", rng.normal(0, 0.5, size=(VOCAB, HIDDEN)).astype(np.float32))
    add("output_norm.weight", (1 + rng.normal(0, 0.01, size=HIDDEN)).astype(np.float32))
    add("output.weight", lin(VOCAB, HIDDEN, 2.0))
    for layer in range(LAYERS):
        p = f"blk.{layer}"
        add(f"{p}.attn_norm.weight", (1 + rng.normal(0, 0.01, size=HIDDEN)).astype(np.float32))
        add(f"{p}.ffn_norm.weight", (1 + rng.normal(0, 0.01, size=HIDDEN)).astype(np.float32))
        add(f"{p}.attn_q.weight", lin(HEADS * hd, HIDDEN))
        add(f"{p}.attn_k.weight", lin(KV_HEADS * hd, HIDDEN))
        add(f"{p}.attn_v.weight", lin(KV_HEADS * hd, HIDDEN))
        add(f"{p}.attn_output.weight", lin(HIDDEN, HEADS * hd))
        add(f"{p}.ffn_gate_inp.weight", lin(EXPERTS, HIDDEN, 2.0))
        add(f"{p}.ffn_gate_exps.weight", np.stack([lin(FF, HIDDEN) for _ in range(EXPERTS)]))
        add(f"{p}.ffn_up_exps.weight", np.stack([lin(FF, HIDDEN) for _ in range(EXPERTS)]))
        add(f"{p}.ffn_down_exps.weight", np.stack([lin(HIDDEN, FF) for _ in range(EXPERTS)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def reference(path: str) -> dict:
    r = gguf.GGUFReader(path)
    tensors = {}
    for t in r.tensors:
        if t.tensor_type not in (
            gguf.GGMLQuantizationType.Q4_K,
            gguf.GGMLQuantizationType.Q5_K,
            gguf.GGMLQuantizationType.Q6_K,
        ):
            continue
        v = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
        picks = sorted(set([0, 1, 255, 256, v.size // 2, v.size - 1]))
        tensors[t.name] = {
            "type": t.tensor_type.name,
            # PyTorch order (outermost first).
            "shape": [int(x) for x in reversed(t.shape.tolist())],
            "fnv1a64": f"{fnv1a64(v.tobytes()):016x}",
            "values": {str(i): int(v[i:i + 1].view(np.uint32)[0]) for i in picks},
        }
    # MXFP4: gguf-py's quantizer on values with zeros and outliers, every exponent range.
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, size=(4, 64)).astype(np.float32)
    x[0, :5] = 0.0
    x[1, 3] = 40.0
    x[2] *= 1e-3
    x[3] *= 300.0
    blocks = quantize(x, gguf.GGMLQuantizationType.MXFP4)
    deq = dequantize(blocks, gguf.GGMLQuantizationType.MXFP4).astype(np.float32).reshape(-1)
    return {
        "source": "ggml_quantize_chunk (llama.cpp) in a Q4_K_M mix with Q5_K ffn_up_exps; gguf-py dequantize",
        "tensors": tensors,
        "mxfp4": {
            "rows": 4,
            "cols": 64,
            "blocks_hex": blocks.tobytes().hex(),
            "values": [int(b) for b in deq.view(np.uint32)],
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--libggml",
        default=os.path.expanduser("~/.cache/tandem-peers/llbuild/bin/libggml-base.so"),
    )
    args = ap.parse_args()
    lib = ctypes.CDLL(args.libggml)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_void_p]
    out = os.path.join(GGUF_DIR, "kquant-q4_k_m.gguf")
    write_model(out, lib)
    ref = reference(out)
    kinds = sorted({t["type"] for t in ref["tensors"].values()})
    print(f"{out}: {os.path.getsize(out)} bytes, K-quant types {kinds}", file=sys.stderr)
    with open(os.path.join(GGUF_DIR, "kquant-reference.json"), "w") as f:
        json.dump(ref, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
