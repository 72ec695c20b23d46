"""ferrotune's conversion of a GGUF file (examples/gguf_to_hf) against transformers'.

1. Weights: every tensor of the converted model.safetensors against the state dict of
   `AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)` (transformers dequantises
   with the gguf package and undoes llama.cpp's q/k row order itself): max |Δ| per tensor,
   which must be 0 up to f32 rounding (both dequantise the same blocks).
2. Tokenizer: ids of ferrotune's tokenizer (printed by the example) against
   `AutoTokenizer.from_pretrained(dir, gguf_file=name)` on texts with digits, unicode,
   runs of spaces, newlines, tabs, special tokens and a chat-template prompt; must be equal.
3. The converted directory as a plain Hugging Face model: transformers loads it (config,
   tokenizer, chat template) and its next token after "The capital of France is" is
   printed (" Paris" for SmolLM2-135M-Instruct), and its logits equal those of
   transformers' own GGUF load within 1e-4.
Run by scripts/check-gguf; exits 1 on any mismatch."""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXTS = [
    "The capital of France is",
    "12345 and 3.14159, 1,000,000 or 2024-11-30",
    "héllo wörld — 日本語 🎉 naïve café",
    "  two  spaces\n\nnewlines\tTab   trailing   ",
    "\n\n\n  \t ",
    "don't you'll I'm we've they'd it's",
    "<|im_start|>user\nHi<|im_end|>",
    "def f(x):\n    return x**2  # square\n",
    "",
]
WEIGHT_BOUND = 1e-6
LOGIT_BOUND = 1e-4


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--convert", required=True, help="the gguf_to_hf example binary")
    ap.add_argument("gguf")
    a = ap.parse_args()
    gguf = os.path.abspath(a.gguf)
    gdir, gname = os.path.dirname(gguf), os.path.basename(gguf)
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "model")
        with open(os.path.join(tmp, "texts.json"), "w") as f:
            ref_tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
            chat = ref_tok.apply_chat_template(
                [{"role": "user", "content": "What is 2+2? Answer in 1 word."}],
                tokenize=False, add_generation_prompt=True)
            texts = TEXTS + [chat]
            json.dump(texts, f)
        p = subprocess.run([a.convert, gguf, out, "--tokenize", f.name],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        sys.stderr.write(p.stderr)
        if p.returncode != 0:
            print(f"conversion failed (exit {p.returncode})")
            return 1
        ours_ids = json.loads(p.stdout.strip().splitlines()[-1])

        print("== tokenizer ids (ferrotune vs transformers GGUF tokenizer)")
        for text, ours in zip(texts, ours_ids):
            ref = ref_tok(text, add_special_tokens=True)["input_ids"]
            ok = ours == ref
            bad += not ok
            print(f"  {'ok  ' if ok else 'DIFF'} {len(ref):3d} ids  {text[:50]!r}" +
                  ("" if ok else f"\n     ours {ours}\n     ref  {ref}"))

        print("== weights: max |Δ| per tensor (ferrotune vs transformers GGUF dequantisation)")
        ref_model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, torch_dtype=torch.float32)
        ref_sd = {k: v.float() for k, v in ref_model.state_dict().items()}
        ours = load_file(os.path.join(out, "model.safetensors"))
        tied = ref_model.config.tie_word_embeddings
        want = {k for k in ref_sd if not (tied and k == "lm_head.weight")}
        missing, extra = want - set(ours), set(ours) - want
        if missing or extra:
            bad += 1
            print(f"  names differ: missing {sorted(missing)[:5]}, extra {sorted(extra)[:5]}")
        worst = (0.0, "")
        by_kind = {}
        for k in sorted(want & set(ours)):
            if ours[k].shape != ref_sd[k].shape:
                bad += 1
                print(f"  {k}: shape {tuple(ours[k].shape)} != {tuple(ref_sd[k].shape)}")
                continue
            d = (ours[k] - ref_sd[k]).abs().max().item()
            kind = k.split(".")[-2] if k.startswith("model.layers.") else k
            by_kind[kind] = max(by_kind.get(kind, 0.0), d)
            worst = max(worst, (d, k))
        for kind, d in sorted(by_kind.items()):
            print(f"  {kind:40s} max |Δ| {d:.3g}")
        print(f"  {len(want & set(ours))} tensors, worst {worst[1]} {worst[0]:.3g} (bound {WEIGHT_BOUND})")
        bad += worst[0] > WEIGHT_BOUND

        print("== the converted directory as a Hugging Face model")
        model = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(out)
        same_chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is 2+2? Answer in 1 word."}],
            tokenize=False, add_generation_prompt=True) == chat
        print(f"  chat template renders the same prompt: {same_chat}")
        bad += not same_chat
        ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(ids).logits[0, -1]
            ref_logits = ref_model(ids).logits[0, -1]
        d = (logits - ref_logits).abs().max().item()
        nxt = tokenizer.decode([int(logits.argmax())])
        print(f"  next token after 'The capital of France is': {nxt!r}; logits max |Δ| vs transformers' GGUF load {d:.3g} (bound {LOGIT_BOUND})")
        bad += d > LOGIT_BOUND
    print("OK" if bad == 0 else f"{bad} mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
