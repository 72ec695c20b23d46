"""transformers' pipeline("text-classification") over a text file, for bench/predict-stream.

Usage: torch_pipeline.py MODEL_DIR INPUT.txt OUTPUT.jsonl THREADS BATCH_SIZE
Prints one JSON line: {"lines", "seconds", "lines_per_s", "peak_rss_mb", "batch_size"}.
Loads the model as a user would (`pipeline(..., model=MODEL_DIR)`), truncating to the
model's max length, and writes one {"label", "scores"} line per input (scores for every
label, as `ferrotune predict` writes them) so the two outputs can be compared.
"""
import json
import resource
import sys
import time

import torch
from transformers import pipeline

model_dir, inp, out, threads, batch = sys.argv[1:6]
torch.set_num_threads(int(threads))
cfg = json.load(open(f"{model_dir}/config.json"))
max_len = cfg.get("ferrotune", {}).get("max_seq_length", 128)
clf = pipeline("text-classification", model=model_dir, device="cpu", top_k=None)
texts = [l.rstrip("\n") for l in open(inp, encoding="utf-8") if l.strip()]
t0 = time.perf_counter()
with open(out, "w") as f:
    for r in clf(texts, batch_size=int(batch), truncation=True, max_length=max_len):
        scores = {d["label"]: d["score"] for d in r}
        top = max(scores, key=scores.get)
        f.write(json.dumps({"label": top, "scores": scores}) + "\n")
dt = time.perf_counter() - t0
print(json.dumps({
    "lines": len(texts),
    "seconds": round(dt, 2),
    "lines_per_s": round(len(texts) / dt, 1),
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    "batch_size": int(batch),
}))
