"""Decoders against transformers (f32).

1. Tiny random Llama checkpoints (grouped-query attention, tied and untied heads, a
   llama3 rotary scaling) and GPT-2 checkpoints, built and saved by transformers
   (`save_pretrained`), read by ferrotune (`examples/lm_logits`): next-token logits on the
   same ids within 1e-4, and the sequence classifier's logits (right-padded batch) too.
2. With --gguf FILE: SmolLM2 as transformers dequantises it (`gguf_file=`), against
   ferrotune reading the same GGUF: logits within 1e-4 on a prompt, and greedy
   generation, 32 new tokens for each of 3 prompts, token for token
   (`ferrotune generate --temperature 0`).
Run by scripts/check-decoder-parity."""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import transformers

BOUND = 1e-4
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]


def ferrotune_logits(exe, model_dir, ids, mask=None, classify=0):
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"ids": ids, "mask": mask}, f)
        path = f.name
    cmd = [exe, model_dir, path]
    if classify:
        cmd += ["--classify", str(classify)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    os.unlink(path)
    return np.array(json.loads(out), dtype=np.float64)


def check(name, ours, theirs):
    d = float(np.abs(ours - theirs).max())
    ok = d <= BOUND
    print(f"{name}: max |Δ| = {d:.2e} ({'ok' if ok else 'FAIL'}, bound {BOUND})")
    return ok


def tiny_llama(kind):
    torch.manual_seed({"gqa": 1, "tied": 2, "llama3": 3}[kind])
    cfg = dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2 if kind != "tied" else 4,
        max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=kind == "tied", pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    if kind == "llama3":
        cfg["rope_scaling"] = {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
        }
        cfg["rope_theta"] = 500000.0
    return transformers.LlamaConfig(**cfg), transformers.LlamaForCausalLM


def tiny_gpt2():
    torch.manual_seed(4)
    cfg = transformers.GPT2Config(
        vocab_size=97, n_positions=128, n_embd=64, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0,
    )
    return cfg, transformers.GPT2LMHeadModel


def random_norms(model):
    """Norm scales away from 1 (and shifts away from 0), so a loader that skips them shows."""
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def tiny_checks(exe, families):
    ok = True
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 97, size=(2, 23)).tolist()
    for kind in families:
        cfg, cls = tiny_gpt2() if kind == "gpt2" else tiny_llama(kind)
        model = cls(cfg).eval()
        random_norms(model)
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d, safe_serialization=True)
            with torch.no_grad():
                theirs = model(torch.tensor(ids)).logits.reshape(-1, cfg.vocab_size).numpy()
            ok &= check(f"{kind} next-token logits", ferrotune_logits(exe, d, ids), theirs)
            # The sequence classifier on a right-padded batch: transformers' score head,
            # read at the last non-padding token.
            seq_cls = {
                "gpt2": transformers.GPT2ForSequenceClassification,
            }.get(kind, transformers.LlamaForSequenceClassification)
            cfg.num_labels = 3
            clf = seq_cls.from_pretrained(d, config=cfg).eval()
            with torch.no_grad():
                clf.score.weight.normal_(0, 0.5)
            with tempfile.TemporaryDirectory() as d2:
                clf.save_pretrained(d2, safe_serialization=True)
                padded = [row[:] for row in ids]
                mask = [[1] * 23, [1] * 17 + [0] * 6]
                padded[1][17:] = [0] * 6
                with torch.no_grad():
                    theirs = clf(torch.tensor(padded), attention_mask=torch.tensor(mask)).logits.numpy()
                ours = ferrotune_logits(exe, d2, padded, mask, classify=3)
                ok &= check(f"{kind} classifier logits (padded batch)", ours, theirs)
    return ok


def gguf_checks(exe, cli, gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, name = os.path.split(os.path.abspath(gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, torch_dtype=torch.float32).eval()
    ok = True
    ids = tok(PROMPTS[0])["input_ids"]
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].numpy()
    ours = ferrotune_logits(exe, gguf, [ids])
    ok &= check("SmolLM2 (dequantised GGUF) logits", ours, theirs)
    for p in PROMPTS:
        enc = tok(p, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=32, do_sample=False)
        theirs = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        ours = subprocess.run(
            [cli, "generate", "--model", gguf, "--prompt", p, "--max-new-tokens", "32",
             "--temperature", "0", "--quiet"],
            check=True, capture_output=True, text=True,
        ).stdout
        same = ours == theirs
        ok &= same
        print(f"greedy {p!r}: {'same text (32 new tokens, or up to the same EOS)' if same else 'DIFFERENT'}")
        if not same:
            print(f"  transformers: {theirs!r}\n  ferrotune:    {ours!r}")
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--logits", required=True, help="examples/lm_logits binary")
    ap.add_argument("--cli", help="the ferrotune binary (for --gguf)")
    ap.add_argument("--families", default="gqa,tied,llama3,gpt2")
    ap.add_argument("--gguf", help="SmolLM2 GGUF file")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    ok = tiny_checks(a.logits, [f for f in a.families.split(",") if f])
    if a.gguf:
        ok &= gguf_checks(a.logits, a.cli, a.gguf)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
