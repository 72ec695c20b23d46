#!/usr/bin/env python3
"""Parity of ferrotune's LoRA adapters with Hugging Face PEFT on a tiny random model.

  PY=$(bench/torch-env | tail -n1)
  $PY scripts/check_lora_parity.py --ferrotune target/release/ferrotune \
      --base DIR/base --train DIR/train.csv --work DIR

DIR/base is a tiny pretrained checkpoint written by ferrotune
(`cargo run --release --example tiny_model -- bert DIR`). For each target setting
(`["query", "value"]`, then `"all-linear"`), `ferrotune train` fine-tunes DIR/base with
LoRA; then, each printing the largest absolute difference of class probabilities and
failing above --tol:
1. PEFT: `PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(
   base, num_labels=N), run/adapter)` against `ferrotune predict --model base --adapter
   run/adapter`.
2. transformers on the merged export run/model against the same predictions.
"""
import argparse
import json
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


def run(cmd):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(map(str, cmd))}\n{r.stderr}")
    return r.stdout


def read_jsonl(path):
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


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
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    ft, base, work = args.ferrotune, args.base, args.work
    texts = work / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    max_len = 32
    tok = AutoTokenizer.from_pretrained(base)
    enc = tok(TEXTS, truncation=True, max_length=max_len, padding=True, return_tensors="pt")
    ok = True
    for name, targets in [("query-value", '["query", "value"]'), ("all-linear", '"all-linear"')]:
        print(f"LoRA {name}:")
        run_dir = work / f"run-{name}"
        recipe = work / f"recipe-{name}.toml"
        recipe.write_text(
            f"model_name_or_path = {json.dumps(str(base))}\n"
            f"train_file = {json.dumps(str(args.train))}\n"
            f"validation_split = 0.25\nnum_train_epochs = 2\nlearning_rate = 2e-2\n"
            f"max_seq_length = {max_len}\nper_device_train_batch_size = 8\n"
            f"lora_r = 4\nlora_alpha = 16\nlora_dropout = 0.1\n"
            f"lora_target_modules = {targets}\n")
        run([ft, "train", "--recipe", recipe, "--output-dir", run_dir])
        adapter = run_dir / "adapter"
        pred = work / f"pred-{name}.jsonl"
        run([ft, "predict", "--model", base, "--adapter", adapter, "--input", texts,
             "--output", pred])
        side = json.loads((adapter / "ferrotune_config.json").read_text())
        labels = [side["id2label"][str(i)] for i in range(side["num_labels"])]
        got = [[p["scores"][l] for l in labels] for p in read_jsonl(pred)]

        m = AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(labels))
        m = PeftModel.from_pretrained(m, adapter).eval()
        with torch.no_grad():
            want = torch.softmax(m(**enc).logits, -1).tolist()
        diff = max(abs(a - b) for r, s in zip(want, got) for a, b in zip(r, s))
        ok &= report("PEFT base + adapter vs ferrotune --adapter", diff, args.tol)

        merged = AutoModelForSequenceClassification.from_pretrained(run_dir / "model").eval()
        with torch.no_grad():
            want = torch.softmax(merged(**enc).logits, -1).tolist()
        diff = max(abs(a - b) for r, s in zip(want, got) for a, b in zip(r, s))
        ok &= report("transformers merged export vs ferrotune --adapter", diff, args.tol)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
