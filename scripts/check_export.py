#!/usr/bin/env python3
"""Parity check: a model exported by ferrotune, run by transformers, must give
the probabilities that `ferrotune predict` gave.

  PY=$(bench/torch-env | tail -n1)
  $PY scripts/check_export.py --model runs/x/export --input texts.jsonl \
      --predictions predictions.jsonl

--input lines are {"text": ...}; --predictions lines (one per input) are
{"label": "<top label>", "scores": {"<label>": prob, ...}}. Prints the number
of texts, the largest absolute probability difference and the top-label
agreement rate; exits 1 when the difference exceeds --tol.
"""

import argparse
import json
import sys
from pathlib import Path


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def default_max_length(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    ferro = config.get("ferrotune")
    if isinstance(ferro, dict) and ferro.get("max_seq_length"):
        return int(ferro["max_seq_length"]), "config.json ferrotune.max_seq_length"
    tc = model_dir / "tokenizer_config.json"
    if tc.is_file():
        n = json.loads(tc.read_text()).get("model_max_length")
        if isinstance(n, (int, float)) and 0 < n < 1_000_000:  # HF writes ~1e30 for "unset"
            return int(n), "tokenizer_config.json model_max_length"
    return 512, "default"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path, help="exported HF model directory")
    ap.add_argument("--input", required=True, help='JSONL of {"text": ...}')
    ap.add_argument("--predictions", required=True, help="JSONL written by ferrotune predict")
    ap.add_argument("--max-length", type=int, help="truncation length (default: from the export)")
    ap.add_argument("--tol", type=float, default=1e-4, help="largest allowed |difference| (default 1e-4)")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if args.max_length:
        max_len, source = args.max_length, "--max-length"
    else:
        max_len, source = default_max_length(args.model)

    texts = [row["text"] for row in read_jsonl(args.input)]
    preds = read_jsonl(args.predictions)
    if len(texts) != len(preds):
        sys.exit(f"check_export: {len(texts)} inputs but {len(preds)} predictions")

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model)
    model.to(torch.float32).eval()
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]

    probs = []
    with torch.no_grad():
        for i in range(0, len(texts), args.batch_size):
            enc = tokenizer(texts[i:i + args.batch_size], truncation=True, max_length=max_len,
                            padding=True, return_tensors="pt")
            probs += torch.softmax(model(**enc).logits.float(), dim=-1).tolist()

    max_diff, worst, agree, problems = 0.0, None, 0, []
    for n, (p, pred) in enumerate(zip(probs, preds), start=1):
        scores = pred.get("scores", {})
        if set(scores) != set(labels):
            problems.append(f"line {n}: labels {sorted(scores)} != model's {sorted(labels)}")
            continue
        for j, label in enumerate(labels):
            d = abs(p[j] - float(scores[label]))
            if d > max_diff:
                max_diff, worst = d, (n, label, p[j], float(scores[label]))
        agree += labels[max(range(len(labels)), key=lambda j: p[j])] == pred.get("label")

    print(f"texts: {len(texts)} (max_length {max_len} from {source})")
    print(f"max abs difference: {max_diff:.3g}" + (
        f" (line {worst[0]}, label {worst[1]!r}: transformers {worst[2]:.6f}, ferrotune {worst[3]:.6f})"
        if worst else ""))
    print(f"top-label agreement: {agree}/{len(texts)} = {agree / max(len(texts), 1):.4f}")
    for msg in problems[:10]:
        print(f"error: {msg}")
    ok = not problems and max_diff <= args.tol
    print("PASS" if ok else f"FAIL (tolerance {args.tol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
