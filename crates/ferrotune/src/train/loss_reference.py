#!/usr/bin/env python3
"""Reference values for the tests in `loss.rs`.

Computes every loss in `crates/ferrotune/src/train/loss.rs` with PyTorch (float64) on
fixed small inputs, and prints, for each case, the loss value and its gradient with
respect to the logits / predictions, as Rust tuples `("name", loss, &[grad...])` with the
gradient flattened in row-major order. The Rust tests hard-code this output.

Run:  /root/.cache/ferrotune/torch-venv/bin/python crates/ferrotune/src/train/loss_reference.py

The inputs below must stay identical to those in the `tests` module of `loss.rs`.
"""

import torch
import torch.nn.functional as F

torch.set_default_dtype(torch.float64)

# --- classification (N=5, C=3): includes a +-30 row and a row with p_y ~ 1 -------------
Z = [
    [1.0, 2.0, 3.0],
    [1.0, -1.0, 0.0],
    [30.0, -30.0, 0.5],
    [-20.0, 25.0, 0.0],
    [0.5, 0.5, -0.25],
]
Y = [2, 0, 1, 1, 0]
CLASS_W = [0.25, 1.0, 2.5]

# --- multi-label (N=5, C=3): includes +-100, +-30 and an exact 0 -----------------------
X = [
    [0.5, -1.0, 2.0],
    [100.0, -100.0, 0.0],
    [-30.0, 30.0, 0.25],
    [1.5, -0.75, -2.0],
    [0.0, 3.0, -3.0],
]
YM = [
    [1.0, 0.0, 1.0],
    [0.0, 1.0, 1.0],
    [1.0, 1.0, 0.0],
    [0.0, 0.0, 1.0],
    [1.0, 0.0, 0.0],
]
POS_W = [3.0, 0.5, 1.0]

# --- regression (N=4, C=2): differences 0.1, 2.0, -1.5, 0.0, 2.5, -0.9, 0.6, 2.2 ------
P = [[0.1, 2.0], [-1.5, 0.3], [3.0, -0.7], [0.0, 1.2]]
T = [[0.0, 0.0], [0.0, 0.3], [0.5, 0.2], [-0.6, -1.0]]

# --- penalties ---------------------------------------------------------------------------
W1 = [[0.5, -1.0], [0.0, 2.0]]
W2 = [-0.25, 3.0, 0.0]


def focal_multiclass(z, y, gamma, alpha=None):
    """FL = -alpha_y (1 - p_y)^gamma log p_y, mean over the batch."""
    logp = F.log_softmax(z, dim=-1).gather(1, y[:, None]).squeeze(1)
    p = logp.exp()
    fl = -((1.0 - p) ** gamma) * logp
    if alpha is not None:
        fl = alpha[y] * fl
    return fl.mean()


def sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2.0):
    """torchvision.ops.sigmoid_focal_loss(reduction="mean"), copied verbatim."""
    p = torch.sigmoid(inputs)
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    return loss.mean()


def case(name, x0, f):
    x = torch.tensor(x0, requires_grad=True)
    loss = f(x)
    loss.backward()
    grad = x.grad.flatten().tolist()
    body = ", ".join(repr(g) for g in grad)
    print(f'("{name}", {loss.item()!r}, &[{body}]),')


def penalty_case(name, f):
    w1 = torch.tensor(W1, requires_grad=True)
    w2 = torch.tensor(W2, requires_grad=True)
    loss = f([w1, w2])
    loss.backward()
    grad = w1.grad.flatten().tolist() + w2.grad.flatten().tolist()
    body = ", ".join(repr(g) for g in grad)
    print(f'("{name}", {loss.item()!r}, &[{body}]),')


def main():
    y = torch.tensor(Y)
    cw = torch.tensor(CLASS_W)
    ym = torch.tensor(YM)
    pw = torch.tensor(POS_W)
    t = torch.tensor(T)

    case("ce_plain", Z, lambda z: F.cross_entropy(z, y))
    case("ce_smooth", Z, lambda z: F.cross_entropy(z, y, label_smoothing=0.1))
    case("ce_weighted", Z, lambda z: F.cross_entropy(z, y, weight=cw))
    case("ce_weighted_smooth", Z, lambda z: F.cross_entropy(z, y, weight=cw, label_smoothing=0.1))

    case("bce_plain", X, lambda x: F.binary_cross_entropy_with_logits(x, ym))
    case("bce_pos_weight", X, lambda x: F.binary_cross_entropy_with_logits(x, ym, pos_weight=pw))

    case("focal_g0", Z, lambda z: focal_multiclass(z, y, 0.0))
    case("focal_g0_alpha", Z, lambda z: focal_multiclass(z, y, 0.0, cw))
    case("focal_g05", Z, lambda z: focal_multiclass(z, y, 0.5))
    case("focal_g2", Z, lambda z: focal_multiclass(z, y, 2.0))
    case("focal_g2_alpha", Z, lambda z: focal_multiclass(z, y, 2.0, cw))

    case("focal_bin_g2_a025", X, lambda x: sigmoid_focal_loss(x, ym, alpha=0.25, gamma=2.0))
    case("focal_bin_g05_noalpha", X, lambda x: sigmoid_focal_loss(x, ym, alpha=-1.0, gamma=0.5))

    case("mse", P, lambda p: F.mse_loss(p, t))
    case("smooth_l1_b1", P, lambda p: F.smooth_l1_loss(p, t, beta=1.0))
    case("smooth_l1_b05", P, lambda p: F.smooth_l1_loss(p, t, beta=0.5))
    case("smooth_l1_b0", P, lambda p: F.smooth_l1_loss(p, t, beta=0.0))
    case("huber_d1", P, lambda p: F.huber_loss(p, t, delta=1.0))
    case("huber_d2", P, lambda p: F.huber_loss(p, t, delta=2.0))

    penalty_case("l1_penalty", lambda ws: sum(w.abs().sum() for w in ws))
    penalty_case("l2_penalty", lambda ws: sum((w * w).sum() for w in ws))


if __name__ == "__main__":
    main()
