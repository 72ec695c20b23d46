"""The SmolLM2 LoRA causal-LM recipe in PyTorch + transformers + PEFT, for
bench/smollm2-lm-side-by-side: the same dequantised weights (the HF directory ferrotune
converted the GGUF into), the same BBC News documents and held-out split (ferrotune's
split.json), the same packing (each document's tokens + EOS, cut into block_size blocks),
LoRA all-linear r=8 alpha=16 dropout 0.05, AdamW lr 5e-4 with linear warm-up/decay,
batch size, steps and threads. Prints one JSON line: held-out loss/perplexity before and
after, training tokens/s, peak RSS."""

import argparse
import json
import math
import os
import resource
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup


def blocks(tok, paths, block):
    ids = []
    for p in paths:
        text = Path(p).read_bytes().decode("utf-8", errors="replace")
        ids += tok(text)["input_ids"] + [tok.eos_token_id]
    n = len(ids) // block
    return torch.tensor(ids[: n * block]).view(n, block)


@torch.no_grad()
def eval_loss(model, data, bs):
    model.eval()
    tot, count = 0.0, 0
    for i in range(0, len(data), bs):
        x = data[i : i + bs]
        out = model(input_ids=x, labels=x)
        n = x.numel() - x.shape[0]
        tot += out.loss.item() * n
        count += n
    return tot / count


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", required=True, help="ferrotune's split.json")
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--max-eval-blocks", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(42)
    split = json.load(open(a.split))
    root = Path(a.data)

    def paths(ids):
        return [str(root / i) if not os.path.isabs(i) else i for i in ids]

    tok = AutoTokenizer.from_pretrained(a.model)
    train_ids, eval_ids = split["train"], split["eval"]
    train = blocks(tok, paths(train_ids), a.block_size)
    held = blocks(tok, paths(eval_ids), a.block_size)[: a.max_eval_blocks]
    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                     task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    before = eval_loss(model, held, 8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr,
                            weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, max(1, a.steps // 10), a.steps)
    model.train()
    g = torch.Generator().manual_seed(42)
    order = torch.randperm(len(train), generator=g)
    t0 = time.time()
    tokens = 0
    for step in range(a.steps):
        idx = order[(step * a.batch) % len(train):][: a.batch]
        x = train[idx]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        tokens += x.numel()
    secs = time.time() - t0
    after = eval_loss(model, held, 8)
    print(json.dumps({
        "impl": "pytorch", "torch": torch.__version__, "threads": a.threads,
        "steps": a.steps, "batch": a.batch, "block_size": a.block_size,
        "train_tokens_per_s": tokens / secs, "train_seconds": secs,
        "eval_loss_before": before, "eval_ppl_before": math.exp(before),
        "eval_loss_after": after, "eval_ppl_after": math.exp(after),
        "eval_blocks": len(held),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
