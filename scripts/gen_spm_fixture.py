#!/usr/bin/env python3
"""The SentencePiece fixture: a GGUF whose tokenizer is `tokenizer.ggml.model = "llama"` (SentencePiece
BPE with byte fallback, as in every Mistral/Mixtral GGUF) and what Hugging Face's tokenizer of the
same model gives for a corpus of hard strings.

1. trains a tiny SentencePiece BPE model (1000 pieces, byte fallback, Llama's normalizer settings,
   control symbols `[INST]` `[/INST]`, user-defined symbols `<tool>` `::`) on local text only: the
   docstrings of some Python standard library modules;
2. builds the Hugging Face tokenizer from it with transformers' own conversion
   (`LlamaTokenizerFast.from_pretrained` on a directory holding only `tokenizer.model`, `legacy=True`:
   a space is prepended to the text after every special token, as llama.cpp and the Mixtral v0.1 hub
   tokenizer do), with `add_bos_token` and Mixtral's chat template, and saves it;
3. saves a tiny random Mixtral checkpoint with that tokenizer and converts it with llama.cpp's real
   converter (`convert_hf_to_gguf.py`, which takes its SentencePiece path: tokens, scores, token
   types from `tokenizer.model` and `added_tokens_decoder`, add_bos/add_eos, the chat template);
4. records Hugging Face's ids for every string of `CORPUS` (with and without special tokens) and the
   decodes of those ids (with and without skipping special tokens); and, under "variants", the ids
   and decodes of the same tokenizer built with `add_prefix_space=False` (what a GGUF's
   `tokenizer.ggml.add_space_prefix = false` means) and with `add_eos_token=True`.

  python scripts/gen_spm_fixture.py LLAMA_CPP_DIR

Writes fixtures/spm/{expected.json, tokenizer.json, tokenizer_config.json} and
fixtures/gguf/mixtral-spm-f32.gguf. Needs torch, transformers, sentencepiece, protobuf, numpy
(the converter's imports)."""
import importlib
import io
import json
import pathlib
import subprocess
import sys
import tempfile

import sentencepiece as spm
import torch
import transformers
from transformers import LlamaTokenizerFast, MixtralConfig, MixtralForCausalLM

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "spm"
GGUF = ROOT / "fixtures" / "gguf" / "mixtral-spm-f32.gguf"

MODULES = [
    "string", "textwrap", "collections", "json", "re", "functools", "itertools", "pathlib",
    "argparse", "logging", "subprocess", "threading", "unittest", "email", "http.client",
    "urllib.parse", "csv", "random", "statistics", "fractions", "decimal", "datetime", "calendar",
    "heapq", "bisect", "shutil", "tempfile", "zipfile", "tarfile", "difflib", "pprint",
]

# Mixtral-8x7B-Instruct-v0.1's template.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)

CORPUS = [
    "",
    " ",
    "  ",
    "   ",
    "\t",
    "\n",
    "\n\n",
    "\t\n",
    " \n \n",
    "Hello world",
    " Hello world",
    "Hello World!",
    "  leading spaces",
    "trailing spaces   ",
    "tabs\tand\nnewlines\r\nmixed\t\t\tthree tabs",
    "3333 1234567890 3.14159 -42",
    "Return a new list containing all items from the iterable in ascending order.",
    "def f(x):\n    return x ** 2\n\n\nclass A:\n\tpass\n",
    "Cửa Việt",
    "Ḁ ḁ ß ü é ÀÁÂ",
    "e\u0301 combining",
    "日本語のテキスト 中文字符 한국어",
    "😀🎉👍🏽 🦙",
    "nbsp\u00a0here and zero\u200bwidth",
    "the piece mark \u2581 itself \u2581\u2581",
    "NUL \x00 and DEL \x7f",
    "<s>",
    "</s>",
    "<unk>",
    "<s>Hello</s>",
    "[INST] What is a mixture of experts? [/INST]",
    "<s>[INST] hi [/INST] ok</s>[INST]again[/INST]",
    "[INST]  two spaces after",
    "x<tool>y",
    "<tool> after",
    "a::b::c",
    "::",
    "<0x41> is text",
    "▁▁▁▁indent",
]

MESSAGES = [
    {"role": "user", "content": "What is a mixture of experts?"},
    {"role": "assistant", "content": "A sparse model."},
    {"role": "user", "content": "Explain  it\twith 日本語."},
]


def corpus_lines():
    lines = []
    for name in MODULES:
        mod = importlib.import_module(name)
        for _, obj in sorted(vars(mod).items()):
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str):
                lines.extend(line for line in doc.splitlines() if line.strip())
    return lines


def train(path: pathlib.Path):
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()), model_writer=buf, model_type="bpe",
        vocab_size=1000, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", add_dummy_prefix=True,
        character_coverage=1.0, max_sentencepiece_length=16, control_symbols=["[INST]", "[/INST]"],
        user_defined_symbols=["<tool>", "::"], unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2,
    )
    path.write_bytes(buf.getvalue())


def main():
    llama_cpp = pathlib.Path(sys.argv[1]).resolve()
    with tempfile.TemporaryDirectory() as tmpdir:
        # A fixed directory name: the converter takes general.name from it.
        tmp = pathlib.Path(tmpdir) / "mixtral-spm"
        tmp.mkdir()
        train(tmp / "tokenizer.model")
        tok = LlamaTokenizerFast.from_pretrained(
            tmp, legacy=True, add_bos_token=True, add_eos_token=False)
        tok.chat_template = CHAT_TEMPLATE
        assert len(tok) == 1000, len(tok)
        tok.save_pretrained(tmp)
        # transformers 5 writes no `added_tokens_decoder`; every hub checkpoint of the Mistral era
        # (transformers 4) has one, and llama.cpp's converter reads the token types from it
        # (user-defined symbols are NORMAL without it). Write it as transformers 4 did.
        cfg_path = tmp / "tokenizer_config.json"
        tc = json.loads(cfg_path.read_text())
        tc["added_tokens_decoder"] = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                     "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
            for i, t in sorted(tok.added_tokens_decoder.items())}
        tc.update(add_bos_token=True, add_eos_token=False, legacy=True, chat_template=CHAT_TEMPLATE)
        cfg_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")

        torch.manual_seed(0)
        cfg = MixtralConfig(
            vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, num_local_experts=2,
            num_experts_per_tok=1, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=False)
        model = MixtralForCausalLM(cfg).eval()
        model.save_pretrained(tmp)

        GGUF.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(tmp), "--outtype",
             "f32", "--outfile", str(GGUF)], check=True)

        # Reload what was saved: the oracle is the tokenizer as transformers reads it back.
        hf = LlamaTokenizerFast.from_pretrained(tmp)
        assert hf.legacy and len(hf) == 1000 and hf.encode("hi")[0] == hf.bos_token_id
        OUT.mkdir(parents=True, exist_ok=True)
        for f in ["tokenizer.json", "tokenizer_config.json"]:
            (OUT / f).write_bytes((tmp / f).read_bytes())

        prompts = []
        for text in CORPUS:
            for special in [True, False]:
                ids = hf.encode(text, add_special_tokens=special)
                prompts.append({
                    "text": text,
                    "add_special_tokens": special,
                    "ids": ids,
                    "decode": hf.decode(ids, skip_special_tokens=False),
                    "decode_skip_special": hf.decode(ids, skip_special_tokens=True),
                })
        # The same tokenizer with the options a GGUF may set otherwise:
        # tokenizer.ggml.add_space_prefix = false, and add_bos + add_eos.
        no_prefix = LlamaTokenizerFast.from_pretrained(tmp, add_prefix_space=False)
        bos_eos = LlamaTokenizerFast.from_pretrained(tmp, add_bos_token=True, add_eos_token=True)
        variants = {}
        for name, t, special in [("no_space_prefix", no_prefix, False), ("bos_and_eos", bos_eos, True)]:
            variants[name] = []
            for text in CORPUS:
                ids = t.encode(text, add_special_tokens=special)
                variants[name].append({"text": text, "add_special_tokens": special, "ids": ids,
                                       "decode": t.decode(ids, skip_special_tokens=False)})
        chat = hf.apply_chat_template(MESSAGES, tokenize=False)
        expected = {
            "transformers_version": transformers.__version__,
            "sentencepiece_version": spm.__version__,
            "python_version": sys.version.split()[0],
            "vocab_size": len(hf),
            "bos_token": hf.bos_token,
            "eos_token": hf.eos_token,
            "bos_token_id": hf.bos_token_id,
            "eos_token_id": hf.eos_token_id,
            "chat_template": CHAT_TEMPLATE,
            "chat_messages": MESSAGES,
            "chat_text": chat,
            "chat_ids": hf.encode(chat, add_special_tokens=False),
            "prompts": prompts,
            "variants": variants,
        }
        (OUT / "expected.json").write_text(
            json.dumps(expected, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {OUT} and {GGUF} ({GGUF.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
