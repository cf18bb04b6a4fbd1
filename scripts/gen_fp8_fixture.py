#!/usr/bin/env python3
"""Writes fixtures/deepseek_v3_fp8: the deepseek_v3 fixture as a Hugging Face block-FP8
checkpoint, laid out like deepseek-ai/DeepSeek-V3 (and the Qwen3 / GLM-4.5 "-FP8" releases).

    ~/.cache/tandem-peers/pyenv/bin/python scripts/gen_fp8_fixture.py

What it does (see fixtures/README.md, section "deepseek_v3_fp8"):

1. the bf16 source: every tensor of fixtures/deepseek_v3 rounded to bf16, except
   `e_score_correction_bias` (f32 in DeepSeek-V3's own files);
2. every linear weight (`*_proj.weight`: attention projections, experts, shared experts, the
   dense MLP) quantized to float8_e4m3fn in blocks of BLOCK = [16, 32] (rows, columns): per
   block `scale_inv = amax / 448` (DeepSeek's quantizer), `fp8 = round(w / scale_inv)`; stored
   as `<name>` (F8_E4M3) + `<name>_scale_inv` (F32, `[ceil(out/16), ceil(in/32)]`). 24- and
   40-row and 24- and 48-column weights leave partial blocks on both axes, and the non-square
   block catches a transposed scale grid. The embedding, the norms, the routers
   (`mlp.gate.weight`) and lm_head stay bf16, as in the hub's files;
3. config.json: the source's, `dtype: bfloat16`, plus `quantization_config: {quant_method:
   fp8, fmt: e4m3, activation_scheme: dynamic, weight_block_size: [16, 32]}`;
4. expected.json from transformers (float32 compute, eager attention) for the fixture's prompts:
   `first_logits_source` / `greedy_source` of the bf16 source model; `first_logits_dequantized`
   / `greedy_dequantized` of the model whose linear weights are `f32(fp8) * scale_inv` (f32);
   `first_logits_dequantized_bf16` of the same weights rounded to bf16 (what a loader that
   dequantizes into bf16 holds); and `e4m3fn_values`: torch's float32 value of each of the 256
   bytes viewed as float8_e4m3fn (null for NaN). Cross-check: transformers' own FP8 loader
   (`FineGrainedFP8Config(dequantize=True)`) reads the written directory and must give the
   dequantized logits.
"""

import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "fixtures" / "deepseek_v3"
DEST = ROOT / "fixtures" / "deepseek_v3_fp8"
BLOCK = [16, 32]
FP8_MAX = 448.0
N_NEW = 12


def quantized(name: str, t: torch.Tensor) -> bool:
    return t.dim() == 2 and name.endswith("_proj.weight")


def quantize(w: torch.Tensor, block=BLOCK):
    """Block FP8 of a [out, in] weight: (fp8 [out, in], scale_inv f32 [ceil(out/b0), ceil(in/b1)])."""
    out, inp = w.shape
    b0, b1 = block
    so, si = math.ceil(out / b0), math.ceil(inp / b1)
    w = w.float()
    padded = torch.zeros(so * b0, si * b1)
    padded[:out, :inp] = w
    blocks = padded.view(so, b0, si, b1)
    amax = blocks.abs().amax(dim=(1, 3))
    scale_inv = (amax / FP8_MAX).clamp(min=1e-12).float()
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.reshape(so * b0, si * b1)[:out, :inp].contiguous().to(torch.float8_e4m3fn)
    return q, scale_inv.contiguous()


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block=BLOCK) -> torch.Tensor:
    b0, b1 = block
    out, inp = q.shape
    s = scale_inv.repeat_interleave(b0, 0).repeat_interleave(b1, 1)[:out, :inp]
    return q.float() * s


@torch.no_grad()
def run(model_dir: Path, prompts, **kw):
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", **kw
    ).eval()
    first, greedy, margins = [], [], []
    for p in prompts:
        ids = list(p["ids"])
        toks = []
        for step in range(N_NEW):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            if step == 0:
                first.append(logits.clone())
            top2 = torch.topk(logits, 2)
            margins.append(float(top2.values[0] - top2.values[1]))
            nxt = int(top2.indices[0])
            toks.append(nxt)
            ids.append(nxt)
        greedy.append(toks)
    return model, first, greedy, min(margins)


def transformers_cross_check(tmp: Path, source: dict, plain_cfg: dict, qcfg: dict, prompts) -> float:
    from transformers import FineGrainedFP8Config

    block = [8, 8]
    fp8, deq = {}, {}
    for k, v in source.items():
        if quantized(k, v):
            q, s = quantize(v, block)
            fp8[k], fp8[k + "_scale_inv"] = q, s
            deq[k] = dequantize(q, s, block)
        else:
            fp8[k] = deq[k] = v
    write_dir(tmp / "x_fp8", fp8, dict(plain_cfg, quantization_config=dict(qcfg, weight_block_size=block)))
    write_dir(tmp / "x_deq", deq, plain_cfg)
    _, ours, ours_greedy, _ = run(tmp / "x_deq", prompts)
    # dequantized into f32 (the default output dtype is the scales' type, f32 here)
    _, theirs, theirs_greedy, _ = run(
        tmp / "x_fp8", prompts, quantization_config=FineGrainedFP8Config(dequantize=True)
    )
    diff = max(float((a - b).abs().max()) for a, b in zip(ours, theirs))
    scale = max(float(r.abs().max()) for r in ours)
    assert theirs_greedy == ours_greedy, "transformers' FP8 loader gives other greedy tokens"
    assert diff <= 1e-5 * scale, (diff, scale)
    return diff


def write_dir(d: Path, tensors: dict, config: dict) -> None:
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
        shutil.copy(SRC / f, d / f)


def f32_list(t: torch.Tensor):
    # shortest decimal that round-trips to the same float32
    return [float(str(x)) for x in t.numpy().astype(np.float32)]


def dump(obj: dict) -> str:
    parts = []
    for k, v in obj.items():
        if isinstance(v, list) and v and isinstance(v[0], (list, dict)):
            inner = ",\n".join("  " + json.dumps(x, ensure_ascii=False) for x in v)
            parts.append(f" {json.dumps(k)}: [\n{inner}\n ]")
        else:
            parts.append(f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}")
    text = "{\n" + ",\n".join(parts) + "\n}\n"
    assert json.loads(text) == obj
    return text


def main() -> None:
    src = load_file(str(SRC / "model.safetensors"))
    config = json.loads((SRC / "config.json").read_text())
    prompts = json.loads((SRC / "expected.json").read_text())["prompts"]

    # 1. the bf16 source
    source = {
        k: (v.float() if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16)).contiguous()
        for k, v in src.items()
    }
    # 2. FP8 checkpoint, dequantized weights
    fp8, deq, deq_bf16 = {}, {}, {}
    partial = set()
    for k, v in sorted(source.items()):
        if quantized(k, v):
            q, s = quantize(v)
            fp8[k] = q
            fp8[k + "_scale_inv"] = s
            d = dequantize(q, s)
            deq[k] = d
            deq_bf16[k] = d.to(torch.bfloat16)
            if v.shape[0] % BLOCK[0]:
                partial.add("rows")
            if v.shape[1] % BLOCK[1]:
                partial.add("cols")
        else:
            fp8[k] = v
            deq[k] = v
            deq_bf16[k] = v
    assert partial == {"rows", "cols"}, partial
    n_q = sum(1 for v in fp8.values() if v.dtype == torch.float8_e4m3fn)

    qcfg = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": BLOCK,
    }
    plain_cfg = dict(config, dtype="bfloat16")
    fp8_cfg = dict(plain_cfg, quantization_config=qcfg)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_dir(tmp / "source", source, plain_cfg)
        write_dir(tmp / "deq", deq, plain_cfg)
        write_dir(tmp / "deq_bf16", deq_bf16, plain_cfg)
        write_dir(tmp / "fp8", fp8, fp8_cfg)

        _, src_first, src_greedy, src_margin = run(tmp / "source", prompts)
        _, deq_first, deq_greedy, deq_margin = run(tmp / "deq", prompts)
        _, bf_first, bf_greedy, bf_margin = run(tmp / "deq_bf16", prompts)

        # transformers' own FP8 loader (5.25 derives each tensor's block from its scale grid
        # and refuses partial blocks, so this cross-check uses a copy in blocks of [8, 8],
        # which divide every dimension): its dequantized model must be ours.
        tf_diff = transformers_cross_check(tmp, source, plain_cfg, qcfg, prompts)
        print(f"transformers' FP8 loader vs our dequantization ([8, 8] copy): max |logit diff| {tf_diff:.3g}")

        quant_err = [float((a - b).abs().max()) for a, b in zip(deq_first, src_first)]
        bf_err = [float((a - b).abs().max()) for a, b in zip(bf_first, deq_first)]
        print("max |dequantized - source| per prompt:", [f"{x:.3g}" for x in quant_err])
        print("max |dequantized bf16 - dequantized| per prompt:", [f"{x:.3g}" for x in bf_err])
        print("max |source logit| per prompt:", [f"{float(r.abs().max()):.3g}" for r in src_first])
        print("greedy equal source/dequantized:", src_greedy == deq_greedy, "bf16:", bf_greedy == deq_greedy)

        table = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
        values = [None if math.isnan(x) else float(x) for x in table.tolist()]

        expected = {
            "source": "fixtures/deepseek_v3 rounded to bf16 (e_score_correction_bias kept f32)",
            "torch_version": torch.__version__,
            "transformers_version": __import__("transformers").__version__,
            "weight_block_size": BLOCK,
            "fp8_tensors": n_q,
            "compute_dtype": "float32",
            "attn_implementation": "eager",
            "num_new_tokens": N_NEW,
            "prompts": prompts,
            "first_logits_source": [f32_list(r) for r in src_first],
            "greedy_source": src_greedy,
            "first_logits_dequantized": [f32_list(r) for r in deq_first],
            "greedy_dequantized": deq_greedy,
            "first_logits_dequantized_bf16": [f32_list(r) for r in bf_first],
            "greedy_dequantized_bf16": bf_greedy,
            "max_quantization_logit_error": quant_err,
            "min_margin_source": src_margin,
            "min_margin_dequantized": deq_margin,
            "min_margin_dequantized_bf16": bf_margin,
            "transformers_fp8_loader_max_diff": tf_diff,
            "e4m3fn_values": values,
        }

        if DEST.exists():
            shutil.rmtree(DEST)
        shutil.copytree(tmp / "fp8", DEST)
        (DEST / "expected.json").write_text(dump(expected))
    for f in DEST.iterdir():
        f.chmod(0o644)
    size = sum(f.stat().st_size for f in DEST.iterdir())
    print(f"wrote {DEST} ({size / 1e6:.2f} MB, {n_q} FP8 tensors)")


if __name__ == "__main__":
    sys.exit(main())
