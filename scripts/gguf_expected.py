#!/usr/bin/env python3
"""transformers' greedy tokens for the checkpoint a GGUF file stands for, where the converter
drops a setting the fixture changed from its family's usual value.

llama.cpp's converter does not write GPT-OSS's `swiglu_alpha` / `swiglu_limit` (llama.cpp uses
1.702 and 7.0, those of the released models) nor DeepSeek's YaRN `mscale` (llama.cpp takes
`mscale_all_dim` for it when that is not 1). The `gpt_oss`, `gpt_oss_mxfp4` and `deepseek_v2` fixtures set
other values, so their GGUF files stand for a slightly different model. This script reloads the fixture
with the config patched to what the GGUF file says, checks that the unpatched config still gives the
fixture's own `expected.json` tokens (same method as `gen_fixtures.py`), and writes
`fixtures/gguf/{fixture}.expected.json`: the prompts' greedy tokens and first-step logits.

  python scripts/gguf_expected.py            # gpt_oss, gpt_oss_mxfp4 and deepseek_v2
Needs torch and transformers (the versions of fixtures/README.md, or close)."""
import json, shutil, sys, tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
N_NEW = 12

# fixture -> config keys as the GGUF file states them
PATCHES = {
    "gpt_oss": lambda c: c.update(swiglu_alpha=1.702, swiglu_limit=7.0),
    "gpt_oss_mxfp4": lambda c: c.update(swiglu_limit=7.0),  # swiglu_alpha is already 1.702
    "deepseek_v2": lambda c: c["rope_parameters"].update(mscale=c["rope_parameters"]["mscale_all_dim"]),
}


@torch.no_grad()
def run(d: Path, prompts):
    kwargs = {}
    if "quantization_config" in json.loads((d / "config.json").read_text()):
        from transformers import Mxfp4Config

        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(
        d, dtype=torch.float32, attn_implementation="eager", **kwargs
    ).eval()
    first, greedy, margins = [], [], []
    for p in prompts:
        out = model(input_ids=torch.tensor([p["ids"]]), use_cache=True)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        logits = out.logits[0, -1].float()
        first.append([float(str(x)) for x in logits.numpy()])
        toks = []
        for step in range(N_NEW):
            top2 = torch.topk(logits, 2)
            margins.append(float(top2.values[0] - top2.values[1]))
            nxt = int(top2.indices[0])
            toks.append(nxt)
            if step == N_NEW - 1:
                break
            out = model(input_ids=torch.tensor([[nxt]]), cache=cache, use_cache=True)
            cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            logits = out.logits[0, -1].float()
        greedy.append(toks)
    return first, greedy, min(margins)


def main(names):
    for name in names:
        src = ROOT / "fixtures" / name
        exp = json.loads((src / "expected.json").read_text())
        _, g0, _ = run(src, exp["prompts"])
        assert g0 == exp["greedy"], f"{name}: the unpatched fixture does not give its expected.json"
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp) / name
            shutil.copytree(src, d)
            cfg = json.loads((d / "config.json").read_text())
            PATCHES[name](cfg)
            (d / "config.json").write_text(json.dumps(cfg, indent=2))
            first, greedy, margin = run(d, exp["prompts"])
        changed = sum(a != b for a, b in zip(greedy, exp["greedy"]))
        out = {
            "fixture": name,
            "patched_config": {k: cfg[k] for k in cfg if k in ("swiglu_alpha", "swiglu_limit", "rope_parameters")},
            "prompts_with_other_tokens_than_the_fixture": changed,
            "min_margin": margin,
            "greedy": greedy,
            "first_logits": first,
        }
        path = ROOT / "fixtures" / "gguf" / f"{name}.expected.json"
        path.write_text(json.dumps(out) + "\n")
        print(f"{path}: {changed} of {len(greedy)} prompts generate other tokens than the fixture; "
              f"smallest top-1/top-2 margin {margin:.4g}")


if __name__ == "__main__":
    main(sys.argv[1:] or list(PATCHES))
