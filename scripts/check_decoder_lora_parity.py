#!/usr/bin/env python3
"""Parity of ferrotune's decoder LoRA adapters with Hugging Face PEFT (Llama, GPT-2).

  PY=$(bench/torch-env | tail -n1)
  $PY scripts/check_decoder_lora_parity.py --ferrotune target/release/ferrotune \
      --logits target/release/examples/lm_logits --tiny target/release/examples/tiny_model \
      --work DIR [--families llama,gpt2]

For each family, `tiny_model` writes a tiny random checkpoint (config.json,
model.safetensors, tokenizer) and a labelled CSV; then, for a causal LM (`problem_type =
"causal_lm"` on the CSV's texts, LoRA "all-linear") and a sequence classifier (LoRA on the
attention projections, the new `score` head saved), `ferrotune train` fine-tunes it and
exports `adapter/` (PEFT) and the merged `model/`. Each line prints the largest absolute
difference of logits on the same token ids, failing above --tol (1e-4):
1. PEFT: `PeftModel.from_pretrained(AutoModelFor...(base), run/adapter)` against
   `lm_logits base --adapter run/adapter` (ferrotune with the adapter on the base).
2. transformers on the merged export `run/model` against PEFT's base + adapter.
Run by scripts/check-decoder-lora-parity.
"""
import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np


def run(cmd):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(map(str, cmd))}\n{r.stderr}")
    return r.stdout


def report(name, diff, tol):
    ok = diff <= tol
    print(f"  {name}: max |difference| {diff:.2e} ({'ok' if ok else 'FAIL'}, tolerance {tol:g})")
    return ok


TARGETS = {
    "llama": '["q_proj", "k_proj", "v_proj", "o_proj"]',
    "gpt2": '["c_attn", "c_proj"]',
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ferrotune", required=True)
    ap.add_argument("--logits", required=True, help="the lm_logits example")
    ap.add_argument("--tiny", required=True, help="the tiny_model example")
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--families", default="llama,gpt2")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    ok = True
    for family in args.families.split(","):
        work = args.work / family
        run([args.tiny, family, work])
        base = work / "base"
        rows = list(csv.DictReader(open(work / "train.csv")))
        text = work / "train.txt"
        text.write_text("".join(r["text"] + "\n" for r in rows))
        labels = sorted({r["label"] for r in rows})
        cfg = json.loads((base / "config.json").read_text())
        vocab = cfg["vocab_size"]
        # Ids from 3 up (no special or padding token), one length: no padding anywhere.
        g = torch.Generator().manual_seed(7)
        ids = torch.randint(3, vocab, (3, 12), generator=g)
        ids_file = work / "ids.json"
        ids_file.write_text(json.dumps({"ids": ids.tolist(), "mask": None}))
        common = (
            f"model_name_or_path = {json.dumps(str(base))}\n"
            f"validation_split = 0.25\nnum_train_epochs = 2\nlearning_rate = 2e-2\n"
            f"per_device_train_batch_size = 8\nlora_r = 4\nlora_alpha = 16\n"
            f"lora_dropout = 0.1\n"
        )
        tasks = [
            ("causal LM, all-linear", "lm",
             common + f"train_file = {json.dumps(str(text))}\nproblem_type = \"causal_lm\"\n"
             f"block_size = 16\nlora_target_modules = \"all-linear\"\n", 0),
            ("classifier, attention + saved score", "cls",
             common + f"train_file = {json.dumps(str(work / 'train.csv'))}\n"
             f"max_seq_length = 32\nlora_target_modules = {TARGETS[family]}\n", len(labels)),
        ]
        for name, key, recipe, n in tasks:
            print(f"{family} {name}:")
            run_dir = work / f"run-{key}"
            rp = work / f"recipe-{key}.toml"
            rp.write_text(recipe)
            run([args.ferrotune, "train", "--recipe", rp, "--output-dir", run_dir])
            adapter = run_dir / "adapter"
            ac = json.loads((adapter / "adapter_config.json").read_text())
            print(f"  adapter_config: task_type {ac['task_type']}, target_modules "
                  f"{ac['target_modules']}, modules_to_save {ac['modules_to_save']}, "
                  f"fan_in_fan_out {ac['fan_in_fan_out']}")
            cmd = [args.logits, base, ids_file, "--adapter", adapter]
            if n:
                cmd += ["--classify", n]
            ours = np.array(json.loads(run(cmd)), dtype=np.float64)

            def logits(m):
                m.eval()
                if n:
                    # Needed for a batch; no id of the batch is padding, so the last token
                    # is read, as ferrotune reads it.
                    m.config.pad_token_id = 0
                with torch.no_grad():
                    out = m(input_ids=ids).logits.double()
                return out.reshape(-1, out.shape[-1]).numpy()

            auto = AutoModelForSequenceClassification if n else AutoModelForCausalLM
            kw = {"num_labels": n} if n else {}
            peft = logits(PeftModel.from_pretrained(auto.from_pretrained(base, **kw), adapter))
            ok &= report("PEFT base + adapter vs ferrotune base --adapter",
                         float(np.abs(peft - ours).max()), args.tol)
            merged = logits(auto.from_pretrained(run_dir / "model"))
            ok &= report("transformers merged export vs PEFT base + adapter",
                         float(np.abs(merged - peft).max()), args.tol)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
