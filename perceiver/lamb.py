"""LAMB (You et al., 2019, "Large Batch Optimization for Deep Learning"), as the Perceiver uses it.

Per parameter w with gradient g at step t (betas b1, b2; eps; weight decay wd; lr):
    m = b1 m + (1 - b1) g,          v = b2 v + (1 - b2) g^2
    m_hat = m / (1 - b1^t),         v_hat = v / (1 - b2^t)         (bias correction)
    u = m_hat / (sqrt(v_hat) + eps) + wd * w                        (decoupled weight decay)
    r = ||w|| / ||u||   (r = 1 when either norm is 0)               (layer-wise trust ratio)
    w = w - lr * r * u
Multi-tensor: one torch._foreach_* call per line above for all tensors of a group (a few dozen
kernels per step instead of ~21 per tensor); the trust ratios are computed on the device
(torch.where), without a host synchronisation.

make_lamb (the harness's factory) follows DeepMind's Perceiver training code: biases and
normalisation parameters (every tensor with fewer than 2 dimensions) get no weight decay; weights,
the latent array and the position encodings do; the global gradient norm is clipped when the
config's clip_grad is set (exp13: 10, the reference's max_norm).
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
            ws = [w for w in group["params"] if w.grad is not None]
            if not ws:
                continue
            for w in ws:
                state = self.state[w]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(w, dtype=torch.float32)
                    state["v"] = torch.zeros_like(w, dtype=torch.float32)
                state["step"] += 1
            grads = [w.grad.float() for w in ws]
            ms = [self.state[w]["m"] for w in ws]
            vs = [self.state[w]["v"] for w in ws]
            steps = [self.state[w]["step"] for w in ws]
            torch._foreach_mul_(ms, b1)
            torch._foreach_add_(ms, grads, alpha=1 - b1)
            torch._foreach_mul_(vs, b2)
            torch._foreach_addcmul_(vs, grads, grads, value=1 - b2)
            m_hat = torch._foreach_div(ms, [1 - b1 ** t for t in steps])
            denom = torch._foreach_div(vs, [1 - b2 ** t for t in steps])
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, group["eps"])
            u = torch._foreach_div(m_hat, denom)
            w32 = [w.float() for w in ws]
            if group["weight_decay"]:
                torch._foreach_add_(u, w32, alpha=group["weight_decay"])
            w_norm = torch.stack(torch._foreach_norm(w32))
            u_norm = torch.stack(torch._foreach_norm(u))
            trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
            torch._foreach_mul_(u, list((-group["lr"] * trust).unbind()))
            if all(w.dtype == torch.float32 for w in ws):
                torch._foreach_add_(ws, u)
            else:
                for w, step in zip(ws, u):
                    w.add_(step.to(w.dtype))
        return loss


def make_lamb(params, cfg: dict) -> Lamb:
    """The harness's optimizer factory for `optimizer="lamb"`: no decay on biases/normalisation."""
    params = list(params)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [dict(params=decay), dict(params=no_decay, weight_decay=0.0)]
    return Lamb([g for g in groups if g["params"]], lr=cfg["lr"], weight_decay=cfg["weight_decay"])
