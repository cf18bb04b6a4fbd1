#!/usr/bin/env python3
"""The converter wrapper that made the GGUF fixtures (fixtures/README.md).

Runs llama.cpp's own convert_hf_to_gguf.py on an HF checkpoint whose tokenizer is a locally
trained byte-level BPE (the fixtures'), with three patches:
  * the pre-tokenizer is declared "gpt-2" (same regex as HF ByteLevel; a new tokenizer's hash is
    not in llama.cpp's table);
  * the llama family's vocabulary takes the gpt2/BPE path directly (no sentencepiece model);
  * GLM-4.5's (`Glm4MoeModel`) too: its own vocabulary code looks up GLM's special tokens
    (`[gMASK]`, `<|user|>`, `<|observation|>`) by name, which a fixture's 512-token vocabulary
    does not have (`KeyError: '[gMASK]'`). Everything else (tensors, metadata) is the
    converter's, unpatched.

  python scripts/convert_gguf.py LLAMA_CPP_DIR HF_DIR --outtype f32|q8_0 --outfile OUT.gguf
Needs a python with torch, numpy, transformers, pyyaml, sentencepiece (the converter's imports)."""
import pathlib, runpy, sys

ll = pathlib.Path(sys.argv.pop(1)).resolve()
sys.path.insert(0, str(ll))
sys.path.insert(1, str(ll / "gguf-py"))
import conversion.base as base  # noqa: E402
import conversion.glm as glm  # noqa: E402
import conversion.llama as llama  # noqa: E402

base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
llama.LlamaModel.set_vocab = lambda self: self._set_vocab_gpt2()
glm.Glm4MoeModel.set_vocab = lambda self: self._set_vocab_gpt2()
sys.argv[0] = str(ll / "convert_hf_to_gguf.py")
runpy.run_path(sys.argv[0], run_name="__main__")
