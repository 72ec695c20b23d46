"""ResNet-18 and ResNet-50 against transformers and timm: random-init models built by
each library (batch-norm scales, shifts and running statistics randomised too, so
evaluation-mode batch norm is not the identity), saved in that library's format
(`save_pretrained`; timm's `save_for_hf`), read by ferrotune (`examples/image_logits
--pixels`); logits on the same pixels must agree within 1e-4. With --export DIR: the
library DIR's format belongs to loads it (transformers' AutoModelForImageClassification,
or timm.create_model with the file as pretrained weights) and gives ferrotune's logits
within 1e-4. Run by scripts/check-resnet-parity."""

import argparse
import json
import subprocess
import sys
import tempfile

import numpy as np
import timm
import torch
from safetensors.torch import save_file
from timm.models._hub import save_for_hf
from transformers import AutoModelForImageClassification, ResNetConfig, ResNetForImageClassification

BOUND = 1e-4


def last_batch_norms(model):
    """The batch norm ending each residual branch (transformers': `layer[-1]`; timm's:
    `bn2` of a basic block, `bn3` of a bottleneck)."""
    out = set()
    for m in model.modules():
        if isinstance(m, (timm.models.resnet.BasicBlock, timm.models.resnet.Bottleneck)):
            out.add(m.bn3 if hasattr(m, "bn3") else m.bn2)
        elif type(m).__name__ in ("ResNetBasicLayer", "ResNetBottleNeckLayer"):
            out.add(m.layer[-1].normalization)
    return out


def randomise_batch_norms(model, seed):
    """Random scales, shifts and running statistics; the branch-ending batch norms scaled
    0.3-0.7, as in trained ResNets (timm initialises them to 0), so the residual stream
    keeps a trained model's size instead of growing with every block; and the classifier
    scaled ×10, so the logits are a trained classifier's tens rather than the default
    initialisation's units."""
    g = torch.Generator().manual_seed(seed)
    last = last_batch_norms(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                lo, width = (0.3, 0.4) if m in last else (0.6, 0.8)
                m.weight.copy_(lo + width * torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.6 + 0.8 * torch.rand(n, generator=g))
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(10.0)


def ours(logits_bin, model_dir, x):
    with tempfile.TemporaryDirectory() as d:
        save_file({"pixels": x.contiguous()}, f"{d}/pixels.safetensors")
        out = subprocess.run([logits_bin, model_dir, "--pixels", f"{d}/pixels.safetensors"],
                             check=True, capture_output=True, text=True).stdout
    return np.array([json.loads(l)["logits"] for l in out.splitlines()])


def compare(what, logits_bin, model, model_dir, x):
    model.eval()
    with torch.no_grad():
        want = model(x)
        want = (want.logits if hasattr(want, "logits") else want).numpy()
    got = ours(logits_bin, model_dir, x)
    diff = float(np.abs(got - want).max())
    print(f"{what}: max |logit difference| {diff:.2e} (bound {BOUND:g}) over {x.shape[0]} "
          f"images x {want.shape[1]} classes, input {list(x.shape[2:])}, |logits| up to "
          f"{float(np.abs(want).max()):.2f}")
    return diff <= BOUND


def transformers_model(arch, classes):
    cfg = ResNetConfig() if arch == "resnet50" else ResNetConfig(
        layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512])
    cfg.num_labels = classes
    return ResNetForImageClassification(cfg)


def check_export(a, x):
    cfg = json.load(open(f"{a.export}/config.json"))
    if cfg.get("model_type") == "resnet":
        model = AutoModelForImageClassification.from_pretrained(a.export)
        lib = f"transformers ({type(model).__name__}, {model.config.num_labels} labels)"
        size = 224
    else:
        n = cfg["num_classes"]
        args = {k: v for k, v in cfg.get("model_args", {}).items() if k in ("layers", "channels")}
        model = timm.create_model(cfg["architecture"], pretrained=True, num_classes=n,
                                  pretrained_cfg_overlay=dict(file=f"{a.export}/model.safetensors",
                                                              num_classes=n), **args)
        lib = f"timm ({cfg['architecture']}, {n} classes)"
        size = cfg["pretrained_cfg"]["input_size"][1]
    x = x[:, :, :size, :size]
    return compare(f"export {a.export} loaded by {lib}", a.logits, model, a.export, x)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--logits", required=True, help="the image_logits example binary")
    ap.add_argument("--export", help="only: a directory ferrotune exported, loaded by its library")
    a = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    # Two images of 224×224 and, through the same models, one of an odd size.
    x = torch.randn(2, 3, 224, 224)
    odd = torch.randn(1, 3, 97, 131)
    ok = True
    if a.export:
        ok &= check_export(a, x)
    else:
        with tempfile.TemporaryDirectory() as d:
            for i, arch in enumerate(["resnet18", "resnet50"]):
                hf = transformers_model(arch, 10)
                randomise_batch_norms(hf, i)
                hf.eval()
                hf.save_pretrained(f"{d}/hf-{arch}")
                tm = timm.create_model(arch, pretrained=False, num_classes=10)
                randomise_batch_norms(tm, 10 + i)
                tm.eval()
                save_for_hf(tm, f"{d}/timm-{arch}", safe_serialization=True)
                for lib, m in [("transformers", hf), ("timm", tm)]:
                    for inp in (x, odd):
                        ok &= compare(f"{arch} from {lib}", a.logits, m, f"{d}/{lib if lib == 'timm' else 'hf'}-{arch}", inp)
    print("parity: OK" if ok else "parity: FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
