#!/usr/bin/env python3
"""Sentence-embedding parity: `ferrotune embed` against transformers' mean-pooled last
hidden state (sentence-transformers' pooling), on the same texts.

  PY=$(bench/torch-env | tail -n1)
  $PY scripts/check_embedding.py --model DIR --input texts.jsonl --embeddings emb.jsonl \
      [--max-length N] [--normalize] [--tol 1e-5]

--embeddings is what `ferrotune embed --model DIR --input texts.jsonl` wrote (with the same
--max-length and --normalize). Prints the number of texts and the largest absolute
difference of any coordinate; exits 1 above --tol.
"""

import argparse
import json
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--embeddings", required=True)
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--normalize", action="store_true")
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    import torch
    from transformers import AutoModel, AutoTokenizer

    texts = [json.loads(l)["text"] for l in open(args.input, encoding="utf-8") if l.strip()]
    got = [json.loads(l)["embedding"] for l in open(args.embeddings) if l.strip()]
    if len(got) != len(texts):
        sys.exit(f"{len(texts)} texts but {len(got)} embeddings")
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model).to(torch.float32).eval()
    worst = 0.0
    with torch.no_grad():
        for i in range(0, len(texts), args.batch_size):
            enc = tok(texts[i:i + args.batch_size], truncation=True, max_length=args.max_length,
                      padding=True, return_tensors="pt")
            h = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            e = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            if args.normalize:
                e = torch.nn.functional.normalize(e, dim=-1)
            for want, have in zip(e.tolist(), got[i:i + args.batch_size]):
                worst = max(worst, max(abs(a - b) for a, b in zip(want, have)))
    ok = worst <= args.tol
    print(f"{len(texts)} texts, max |difference| {worst:.2e} "
          f"({'ok' if ok else 'FAIL'}, tolerance {args.tol:g})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
