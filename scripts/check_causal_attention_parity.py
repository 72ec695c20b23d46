"""ferrotune's fused causal grouped-query attention (kernels::decode) against transformers'
LlamaAttention math: `eager_attention_forward` and `sdpa_attention_forward` with the mask
`create_causal_mask` builds from a padding mask, on random Q/K/V (batch 3, 7 and 33
tokens, 6 heads over 1, 2, 3 and 6 KV heads, right and left padding). Outputs of every
query that sees a token, the gradient in the fused QKV input (upstream gradient zero at
padding positions, as a loss's), and decode_attention's last position must agree within
1e-4. Run by scripts/check-causal-attention-parity."""

import argparse
import os
import subprocess
import sys
import tempfile
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

BOUND = 1e-4


def case(exe, batch, seq, heads, kv, dh, left, seed, nans):
    g = torch.Generator().manual_seed(seed)
    width = (heads + 2 * kv) * dh
    qkv = (torch.rand(batch * seq, width, generator=g) * 3 - 1.5).double()
    pads = [min(b * (seq + 2) // 3, seq - 1) for b in range(batch)]
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b, p in enumerate(pads):
        if p:
            if left:
                mask[b, :p] = 0
            else:
                mask[b, seq - p:] = 0
    tokens = mask.double().reshape(batch * seq, 1)
    up = (torch.rand(batch * seq, heads * dh, generator=g) * 2 - 1).double() * tokens
    key_bias = torch.where(mask.bool(), 0.0, torch.finfo(torch.float32).min)
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "in.safetensors"), os.path.join(d, "out.safetensors")
        save_file({"qkv": qkv.float(), "key_bias": key_bias.float(), "up": up.float()}, src)
        subprocess.run([exe, src, dst, str(heads), str(kv)], check=True)
        out = load_file(dst)
    # transformers' side, in float64.
    x = qkv.clone().requires_grad_(True)

    def heads_first(t, n):
        return t.reshape(batch, seq, n, dh).transpose(1, 2)

    q = heads_first(x[:, : heads * dh], heads)
    k = heads_first(x[:, heads * dh : (heads + kv) * dh], kv)
    v = heads_first(x[:, (heads + kv) * dh :], kv)
    module = SimpleNamespace(num_key_value_groups=heads // kv, training=False, is_causal=True)
    results = {}
    for impl in ["eager", "sdpa"]:
        config = LlamaConfig(num_attention_heads=heads, num_key_value_heads=kv, hidden_size=heads * dh)
        config._attn_implementation = impl
        embeds = torch.zeros(batch, seq, heads * dh, dtype=torch.float64)
        m = create_causal_mask(
            config=config,
            inputs_embeds=embeds,
            attention_mask=mask,
            cache=None,
            position_ids=torch.arange(seq).unsqueeze(0).expand(batch, -1),
        )
        fn = eager_attention_forward if impl == "eager" else sdpa_attention_forward
        y, _ = fn(module, q, k, v, m, scaling=dh**-0.5, dropout=0.0)
        results[impl] = y.reshape(batch * seq, heads * dh)
    # Queries that see a token: all but left padding's leading positions.
    seen = torch.ones(batch, seq, dtype=torch.bool)
    if left:
        seen = mask.cumsum(1) > 0
    seen = seen.reshape(-1)
    errs = {}
    for impl, y in results.items():
        errs[f"{impl} y"] = (out["y"].double()[seen] - y.detach()[seen]).abs().max().item()
        (grad,) = torch.autograd.grad((y * up).sum(), x)
        # transformers' eager gradient is NaN at left padding's leading positions (queries
        # that see only padding); ferrotune's must be finite everywhere, and equal
        # wherever transformers' is finite.
        ours = out["dqkv"].double()
        assert torch.isfinite(ours).all(), "ferrotune's gradient is not finite"
        ok = torch.isfinite(grad)
        nans[impl] = nans.get(impl, 0) + int((~ok).sum())
        errs[f"{impl} dqkv"] = (ours[ok] - grad[ok]).abs().max().item()
    last = results["eager"].detach().reshape(batch, seq, -1)[:, -1]
    errs["decode"] = (out["decode"].double() - last).abs().max().item()
    return errs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--exe", required=True, help="the causal_attention_io example")
    args = ap.parse_args()
    worst, nans = 0.0, {}
    for seq in [7, 33]:
        for kv in [1, 2, 3, 6]:
            for left in [False, True]:
                errs = case(args.exe, 3, seq, 6, kv, 8, left, seq * 10 + kv, nans)
                assert all(e == e for e in errs.values()), errs  # no NaN
                worst = max(worst, *errs.values())
                side = "left" if left else "right"
                print(f"seq {seq:2} heads 6/{kv} {side:5} padding: "
                      + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    print(f"non-finite gradient entries of transformers' (skipped): {nans}")
    print(f"largest difference {worst:.2e} (bound {BOUND})")
    sys.exit(0 if worst < BOUND else 1)


if __name__ == "__main__":
    main()
