#!/usr/bin/env python3
"""Run ferrotune's BBC News fine-tuning recipe with PyTorch + transformers.

A yardstick for side-by-side comparison (accuracy and speed); PyTorch is never
a dependency of ferrotune. Run it with the python that bench/torch-env prints:

  PY=$(bench/torch-env | tail -n1)
  $PY bench/torch_bbc_news.py --recipe recipes/bbc-news.toml \
      --split runs/bench-bbc/split.json --threads 2 --output runs/bench-bbc/torch.json

The recipe mirrors what HF Trainer does: AdamW (betas 0.9/0.999, eps 1e-8) with
weight decay on everything but biases and LayerNorm weights, linear warm-up over
warmup_ratio of the steps then linear decay to 0, gradient-norm clipping,
dynamic padding per batch, a seeded shuffle each epoch, the checkpoint's dropout.
Recipe keys used: model_name_or_path, train_file, max_seq_length,
per_device_{train,eval}_batch_size, learning_rate, num_train_epochs, warmup_ratio,
weight_decay, max_grad_norm, seed, encoding_errors; the others are ignored.
Paths in the recipe are relative to the repo root.
"""

import argparse
import json
import math
import os
import random
import sys
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", required=True, help="ferrotune recipe (TOML)")
    ap.add_argument("--split", required=True,
                    help="split.json written by ferrotune: {seed, validation_split, train: [...], eval: [...]}")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all cores)")
    ap.add_argument("--output", help="write results as JSON here")
    ap.add_argument("--max-train-samples", type=int,
                    help="train on a seeded random subset of this many training examples (quick runs)")
    return ap.parse_args()


def repo_path(p):
    p = Path(p)
    return p if p.is_absolute() else REPO / p


def read_text(path, encoding_errors, bad_files):
    """UTF-8; a file that is not valid UTF-8 is decoded as the recipe's
    encoding_errors says ("replace": U+FFFD, like ferrotune; "strict": fail)
    and otherwise as latin-1."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        bad_files.append(str(path))
        if encoding_errors == "strict":
            sys.exit(f"{path} is not valid UTF-8 (encoding_errors = \"strict\")")
        if encoding_errors == "replace":
            return data.decode("utf-8", errors="replace")
        return data.decode("latin-1")


def macro_f1(preds, labels, k):
    f1s = []
    for c in range(k):
        tp = sum(1 for p, y in zip(preds, labels) if p == c and y == c)
        fp = sum(1 for p, y in zip(preds, labels) if p == c and y != c)
        fn = sum(1 for p, y in zip(preds, labels) if p != c and y == c)
        denom = 2 * tp + fp + fn
        f1s.append(2 * tp / denom if denom else 0.0)
    return sum(f1s) / k


def main():
    args = parse_args()
    t_start = time.perf_counter()
    # Keep the tokenizer's rayon pool to the same thread budget.
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))

    import torch
    import transformers
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer,
                              get_linear_schedule_with_warmup)

    torch.set_num_threads(args.threads)

    with open(args.recipe, "rb") as f:
        recipe = tomllib.load(f)
    with open(args.split) as f:
        split = json.load(f)

    model_dir = repo_path(recipe["model_name_or_path"])
    data_dir = repo_path(recipe["train_file"])
    max_len = int(recipe.get("max_seq_length", 128))
    train_bs = int(recipe.get("per_device_train_batch_size", 8))
    eval_bs = int(recipe.get("per_device_eval_batch_size", 32))
    lr = float(recipe.get("learning_rate", 5e-5))
    epochs = int(recipe.get("num_train_epochs", 3))
    warmup_ratio = float(recipe.get("warmup_ratio", 0.0))
    weight_decay = float(recipe.get("weight_decay", 0.0))
    max_grad_norm = float(recipe.get("max_grad_norm", 1.0))
    seed = int(recipe.get("seed", 42))
    encoding_errors = recipe.get("encoding_errors")  # None: latin-1 fallback

    random.seed(seed)
    torch.manual_seed(seed)

    classes = sorted(p.name for p in data_dir.iterdir() if p.is_dir())
    label2id = {c: i for i, c in enumerate(classes)}
    id2label = {i: c for i, c in enumerate(classes)}

    bad_files = []

    def load(ids):
        texts, labels = [], []
        for rel in ids:
            cls = rel.split("/")[0]
            if cls not in label2id:
                sys.exit(f"split id {rel!r}: class {cls!r} is not a folder of {data_dir}")
            texts.append(read_text(data_dir / rel, encoding_errors, bad_files))
            labels.append(label2id[cls])
        return texts, labels

    train_ids = list(split["train"])
    if args.max_train_samples is not None and args.max_train_samples < len(train_ids):
        train_ids = random.Random(seed).sample(train_ids, args.max_train_samples)
    train_texts, train_labels = load(train_ids)
    eval_texts, eval_labels = load(split["eval"])
    how = {"replace": "invalid bytes replaced by U+FFFD"}.get(encoding_errors, "decoded as latin-1")
    for f in bad_files:
        print(f"note: {f} is not valid UTF-8; {how}", file=sys.stderr)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # padding=False also clears the fixed padding baked into this tokenizer.json.
    def encode(texts):
        enc = tokenizer(texts, truncation=True, max_length=max_len, padding=False)
        return [{k: enc[k][i] for k in enc.keys()} for i in range(len(texts))]
    train_enc, eval_enc = encode(train_texts), encode(eval_texts)

    def collate(items, labels):
        width = max(len(it["input_ids"]) for it in items)
        batch = {}
        for key in items[0]:
            pad = tokenizer.pad_token_id if key == "input_ids" else 0
            batch[key] = torch.tensor([it[key] + [pad] * (width - len(it[key])) for it in items])
        batch["labels"] = torch.tensor(labels)
        return batch

    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=len(classes), id2label=id2label, label2id=label2id)
    model.to(torch.float32)

    # Weight decay on all but LayerNorm weights and tensors whose name contains "bias"
    # (HF Trainer's get_decay_parameter_names: biases, and MPNet's relative_attention_bias).
    no_decay = set()
    for mod_name, mod in model.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(mod, torch.nn.LayerNorm) or "bias" in full:
                no_decay.add(full)
    groups = [
        {"params": [p for n, p in model.named_parameters() if n not in no_decay], "weight_decay": weight_decay},
        {"params": [p for n, p in model.named_parameters() if n in no_decay], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    steps_per_epoch = math.ceil(len(train_enc) / train_bs)
    total_steps = steps_per_epoch * epochs
    warmup_steps = math.ceil(warmup_ratio * total_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)

    print(f"pytorch {torch.__version__}, transformers {transformers.__version__}, threads {args.threads}")
    print(f"labels {classes}; train {len(train_enc)}, eval {len(eval_enc)}; "
          f"{steps_per_epoch} steps/epoch x {epochs} epochs, warm-up {warmup_steps} steps")
    sys.stdout.flush()

    def evaluate():
        model.eval()
        total_loss, preds = 0.0, []
        with torch.no_grad():
            for i in range(0, len(eval_enc), eval_bs):
                batch = collate(eval_enc[i:i + eval_bs], eval_labels[i:i + eval_bs])
                out = model(**batch)
                total_loss += torch.nn.functional.cross_entropy(
                    out.logits, batch["labels"], reduction="sum").item()
                preds += out.logits.argmax(-1).tolist()
        n = len(eval_labels)
        acc = sum(int(p == y) for p, y in zip(preds, eval_labels)) / n
        return total_loss / n, acc, macro_f1(preds, eval_labels, len(classes))

    shuffler = torch.Generator().manual_seed(seed)
    results = []
    for epoch in range(1, epochs + 1):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(train_enc), generator=shuffler).tolist()
        for s in range(0, len(order), train_bs):
            idx = order[s:s + train_bs]
            batch = collate([train_enc[i] for i in idx], [train_labels[i] for i in idx])
            loss = model(**batch).loss
            loss.backward()
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        train_s = time.perf_counter() - t0
        eval_loss, acc, f1 = evaluate()
        print(f"epoch {epoch}: eval_loss {eval_loss:.4f} eval_accuracy {acc:.4f} "
              f"eval_macro_f1 {f1:.4f} (train {train_s:.1f} s)")
        sys.stdout.flush()
        results.append({"epoch": epoch, "eval_loss": eval_loss, "eval_accuracy": acc,
                        "eval_macro_f1": f1, "train_seconds": train_s})

    wall = time.perf_counter() - t_start
    print(f"total wall time {wall:.1f} s")
    if args.output:
        out = {
            "framework": "pytorch",
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "threads": args.threads,
            "train_examples": len(train_enc),
            "eval_examples": len(eval_enc),
            "non_utf8_files": bad_files,
            "epochs": results,
            "wall_seconds": wall,
        }
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
