#!/usr/bin/env python3
"""Parity of one model family with transformers, both ways, on a tiny random model.

  PY=$(bench/torch-env | tail -n1)
  $PY scripts/check_family_parity.py --ferrotune target/release/ferrotune \
      --base DIR/base --train DIR/train.csv --work DIR

DIR/base is a tiny pretrained checkpoint written by ferrotune
(`cargo run --release --example tiny_model -- FAMILY DIR`); its config.json and tokenizer
files define the family and shape. Three checks, each printing the largest absolute
difference and failing above --tol:

1. transformers -> ferrotune, classifier: a random AutoModelForSequenceClassification of
   that config (3 labels, tensor names with the family's prefix and transformers' head)
   saved with save_pretrained; `ferrotune predict` on it against transformers' softmax.
2. transformers -> ferrotune, backbone: a random AutoModel saved the same way (names
   without prefix); `ferrotune embed --pooling mean` against transformers' mean-pooled
   last hidden state.
3. ferrotune -> transformers: `ferrotune train` fine-tunes DIR/base on DIR/train.csv and
   exports; transformers' AutoModelForSequenceClassification on the export against
   `ferrotune predict`.
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

TEXTS = [
    "the movie was very good .",
    "awful plot",
    "the acting was not great , the film was poor !",
    "a film",
    "very very fine acting . the plot is bad",
    "the",
]
TOKENIZER_FILES = ["vocab.txt", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "tokenizer.json"]


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(map(str, cmd))}\n{r.stderr}")
    return r.stdout


def read_jsonl(path):
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def save_random(model_cls, base, out, seed, **kw):
    import torch
    from transformers import AutoConfig
    torch.manual_seed(seed)
    cfg = AutoConfig.from_pretrained(base, **kw)
    m = model_cls.from_config(cfg).eval()
    m.save_pretrained(out, safe_serialization=True)
    for f in TOKENIZER_FILES:
        if (base / f).exists():
            shutil.copy(base / f, out / f)
    return m


def encode(tok, texts, max_len):
    return tok(texts, truncation=True, max_length=max_len, padding=True, return_tensors="pt")


def report(name, diff, tol):
    ok = diff <= tol
    print(f"  {name}: max |difference| {diff:.2e} ({'ok' if ok else 'FAIL'}, tolerance {tol:g})")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ferrotune", required=True)
    ap.add_argument("--base", required=True, type=Path)
    ap.add_argument("--train", required=True, type=Path)
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()

    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    ft, base, work = args.ferrotune, args.base, args.work
    family = json.loads((base / "config.json").read_text())["model_type"]
    print(f"{family}:")
    texts = work / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    max_len = 32
    ok = True

    # 1. A transformers classifier, predicted by ferrotune.
    cls_dir = work / "hf-classifier"
    m = save_random(AutoModelForSequenceClassification, base, cls_dir, 1, num_labels=3)
    tok = AutoTokenizer.from_pretrained(cls_dir)
    pred = work / "hf-classifier.jsonl"
    run([ft, "predict", "--model", cls_dir, "--input", texts, "--output", pred])
    with torch.no_grad():
        want = torch.softmax(m(**encode(tok, TEXTS, max_len)).logits, -1).tolist()
    got = [[p["scores"][m.config.id2label[i]] for i in range(3)] for p in read_jsonl(pred)]
    diff = max(abs(a - b) for r, s in zip(want, got) for a, b in zip(r, s))
    ok &= report("transformers classifier, ferrotune predict", diff, args.tol)

    # 2. A transformers backbone, embedded by ferrotune.
    bb_dir = work / "hf-backbone"
    m = save_random(AutoModel, base, bb_dir, 2)
    emb = work / "hf-backbone.jsonl"
    run([ft, "embed", "--model", bb_dir, "--input", texts, "--output", emb,
         "--max-length", str(max_len)])
    with torch.no_grad():
        enc = encode(tok, TEXTS, max_len)
        h = m(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        want = ((h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)).tolist()
    got = [r["embedding"] for r in read_jsonl(emb)]
    diff = max(abs(a - b) for r, s in zip(want, got) for a, b in zip(r, s))
    ok &= report("transformers backbone, ferrotune embed (mean)", diff, args.tol)

    # 3. A ferrotune fine-tune, loaded by transformers.
    recipe = work / "recipe.toml"
    recipe.write_text(
        f"model_name_or_path = {json.dumps(str(base))}\ntrain_file = {json.dumps(str(args.train))}\n"
        f"validation_split = 0.25\nnum_train_epochs = 2\nlearning_rate = 5e-3\n"
        f"max_seq_length = {max_len}\nper_device_train_batch_size = 8\n")
    run([ft, "train", "--recipe", recipe, "--output-dir", work / "run"])
    export = work / "run" / "model"
    pred = work / "export.jsonl"
    run([ft, "predict", "--model", export, "--input", texts, "--output", pred])
    m = AutoModelForSequenceClassification.from_pretrained(export).eval()
    tok = AutoTokenizer.from_pretrained(export)
    labels = [m.config.id2label[i] for i in range(m.config.num_labels)]
    with torch.no_grad():
        want = torch.softmax(m(**encode(tok, TEXTS, max_len)).logits, -1).tolist()
    got = [[p["scores"][l] for l in labels] for p in read_jsonl(pred)]
    diff = max(abs(a - b) for r, s in zip(want, got) for a, b in zip(r, s))
    arch = m.config.architectures[0]
    ok &= report(f"ferrotune export as {arch} in transformers", diff, args.tol)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
