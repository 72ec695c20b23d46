"""EfficientNet-Lite0 against timm: the same normalised pixels through timm's
`tf_efficientnet_lite0` (weights from the package's .pth, renamed to timm's names) and
through ferrotune (`examples/image_logits --pixels`); logits must agree within 1e-4.
Also each image through ferrotune's own decoding and transforms: its top-1 class must be
timm's. Run by scripts/check-image-parity."""

import argparse
import json
import subprocess
import sys
import tempfile

import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from efficientnet_names import timm_name


def check_export(a):
    """timm loads the exported directory (its config.json and model.safetensors) and gives
    ferrotune's logits on the same pixels within 1e-4."""
    cfg = json.load(open(f"{a.export}/config.json"))
    model = timm.create_model(cfg["architecture"], pretrained=True, num_classes=cfg["num_classes"],
                              pretrained_cfg_overlay=dict(file=f"{a.export}/model.safetensors",
                                                          num_classes=cfg["num_classes"]))
    model.eval()
    tf = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in a.images])
    with torch.no_grad():
        want = model(x).numpy()
    with tempfile.TemporaryDirectory() as d:
        save_file({"pixels": x.contiguous()}, f"{d}/pixels.safetensors")
        out = subprocess.run([a.logits, a.export, "--pixels", f"{d}/pixels.safetensors"],
                             check=True, capture_output=True, text=True).stdout
    got = np.array([json.loads(l)["logits"] for l in out.splitlines()])
    diff = float(np.abs(got - want).max())
    print(f"export {a.export} loaded by timm ({cfg['architecture']}, {cfg['num_classes']} classes, "
          f"input {list(x.shape[2:])}): max |logit difference| {diff:.2e} (bound 1e-4)")
    return diff < 1e-4


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pth", required=True)
    ap.add_argument("--logits", required=True, help="the image_logits example binary")
    ap.add_argument("--export", help="also: a directory ferrotune exported, loaded by timm")
    ap.add_argument("images", nargs="+")
    a = ap.parse_args()
    ok = True
    if a.export:
        ok &= check_export(a)
    torch.set_num_threads(2)
    sd = torch.load(a.pth, map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict({timm_name(k): v for k, v in sd.items()})
    model.eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    tf = timm.data.create_transform(**cfg)
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in a.images])
    with torch.no_grad():
        want = model(x).numpy()
    with tempfile.TemporaryDirectory() as d:
        save_file({"pixels": x.contiguous()}, f"{d}/pixels.safetensors")
        out = subprocess.run([a.logits, a.pth, "--pixels", f"{d}/pixels.safetensors", *a.images],
                             check=True, capture_output=True, text=True).stdout
    rows = [json.loads(l) for l in out.splitlines()]
    n = len(a.images)
    got = np.array([r["logits"] for r in rows[:n]])
    diff = float(np.abs(got - want).max())
    ok &= diff < 1e-4
    print(f"same pixels: max |logit difference| {diff:.2e} over {n} images x 1000 classes (bound 1e-4)")
    for p, r, w in zip(a.images, rows[n:], want):
        top = int(np.argmax(w))
        print(f"{p}: timm top-1 {top} (p={float(torch.softmax(torch.tensor(w), 0)[top]):.4f}), "
              f"ferrotune's own decoding and transforms: top-1 {r['top1']}")
        ok &= r["top1"] == top
    print("parity: OK" if ok else "parity: FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
