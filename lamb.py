"""LAMB (You et al., 2019, "Large Batch Optimization for Deep Learning"), as the Perceiver uses it.

Per parameter w with gradient g at step t (betas b1, b2; eps; weight decay wd; lr):
    m = b1 m + (1 - b1) g,          v = b2 v + (1 - b2) g^2
    m_hat = m / (1 - b1^t),         v_hat = v / (1 - b2^t)         (bias correction)
    u = m_hat / (sqrt(v_hat) + eps) + wd * w                        (decoupled weight decay)
    r = ||w|| / ||u||   (r = 1 when either norm is 0)               (layer-wise trust ratio)
    w = w - lr * r * u
The trust ratio is computed on the device (torch.where), without a host synchronisation.
"""
from __future__ import annotations

import torch


class Lamb(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0):
        if lr <= 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid LAMB settings lr={lr} betas={betas} eps={eps} weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for w in group["params"]:
                if w.grad is None:
                    continue
                g = w.grad.float()
                state = self.state[w]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(w, dtype=torch.float32)
                    state["v"] = torch.zeros_like(w, dtype=torch.float32)
                state["step"] += 1
                t = state["step"]
                m, v = state["m"], state["v"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                u = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + group["eps"])
                if group["weight_decay"]:
                    u.add_(w.float(), alpha=group["weight_decay"])
                w_norm, u_norm = w.float().norm(), u.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                w.sub_((group["lr"] * trust * u).to(w.dtype))
        return loss


def make_lamb(params, cfg: dict) -> Lamb:
    """The harness's optimizer factory for `optimizer="lamb"`."""
    return Lamb(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
