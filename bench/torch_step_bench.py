"""PyTorch side of `ferrotune bench`: one training step (forward, cross-entropy, backward,
clipping, AdamW) or one inference pass of a randomly initialised transformers
*ForSequenceClassification of the same family and shape, timed the same way (median over
N steps after 2 warm-up steps). Prints one JSON line like ferrotune's.
Usage: python torch_step_bench.py train|infer --preset PRESET --batch B --seq S
       --steps N --threads T [--precision f32|bf16|int8]
PRESET: minilm-l6, bert-base (BERT), roberta-base, distilbert-base, mpnet-base.
"""
import argparse
import json
import resource
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

# preset: (model_type, hidden, layers, heads, intermediate, vocab), as `ferrotune bench`.
SHAPES = {
    "minilm-l6": ("bert", 384, 6, 12, 1536, 30522),
    "bert-base": ("bert", 768, 12, 12, 3072, 30522),
    "roberta-base": ("roberta", 768, 12, 12, 3072, 50265),
    "distilbert-base": ("distilbert", 768, 6, 12, 3072, 30522),
    "mpnet-base": ("mpnet", 768, 12, 12, 3072, 30527),
}


def parse_args(precisions=("f32", "bf16", "int8")):
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["train", "infer"])
    ap.add_argument("--preset", default="minilm-l6", choices=list(SHAPES))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="f32", choices=list(precisions))
    return ap.parse_args()


def build_model(a):
    """The randomly initialised transformers classifier of `a.preset` (seed 0)."""
    torch.manual_seed(0)
    family, h, l, heads, i, vocab = SHAPES[a.preset]
    if family == "distilbert":
        cfg = AutoConfig.for_model(family, dim=h, n_layers=l, n_heads=heads, hidden_dim=i,
                                   vocab_size=vocab, num_labels=2)
    else:
        extra = {"max_position_embeddings": 514} if family in ("roberta", "mpnet") else {}
        cfg = AutoConfig.for_model(family, hidden_size=h, num_hidden_layers=l,
                                   num_attention_heads=heads, intermediate_size=i,
                                   vocab_size=vocab, num_labels=2, **extra)
    try:  # PyTorch's fused attention where transformers has it for the family
        return AutoModelForSequenceClassification.from_config(cfg, attn_implementation="sdpa")
    except (ValueError, NotImplementedError):
        return AutoModelForSequenceClassification.from_config(cfg)


def flops(a):
    """The step's floating-point operations (as `ferrotune bench` counts them)."""
    family, h, l, heads, i, vocab = SHAPES[a.preset]
    tokens, s = a.batch * a.seq, a.seq
    f = l * (2 * tokens * (4 * h * h + 2 * h * i) + 4 * a.batch * s * s * h)
    return f * (3 if a.mode == "train" else 1)


def time_steps(step, steps):
    """Milliseconds of each of `steps` calls of `step`, after 2 warm-up calls."""
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        step()
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1000)
    return times


def report(a, times, **extra):
    """The JSON line `ferrotune bench` prints: median and min ms, GFLOP/s, peak RSS."""
    med = statistics.median(times)
    print(json.dumps({"median_ms": med, "min_ms": min(times), "gflops": flops(a) / (med / 1000) / 1e9,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "threads": a.threads, **extra}))


def main():
    a = parse_args()
    torch.set_num_threads(a.threads)
    model = build_model(a)
    if a.precision == "int8":  # PyTorch's dynamic quantization of the linear layers
        assert a.mode == "infer", "int8 is for inference"
        model.eval()
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    ids = torch.randint(1000, 30000, (a.batch, a.seq))
    mask = torch.ones_like(ids)
    labels = torch.tensor([k % 2 for k in range(a.batch)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.precision == "bf16"):
            if a.mode == "train":
                model.train()
                out = model(input_ids=ids, attention_mask=mask, labels=labels)
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            else:
                model.eval()
                with torch.inference_mode():
                    model(input_ids=ids, attention_mask=mask).logits.float().numpy()

    report(a, time_steps(step, a.steps), torch=torch.__version__)


if __name__ == "__main__":
    main()
