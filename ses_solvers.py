"""The exact eigen-solve under the SES penalty: routes, the entropy of a stack of Grams, the auto choice.

Given m symmetric PSD float32 matrices G_l (k_l x k_l, one per hooked layer, see ses_core), every
route returns H_l = -sum_i p_i log p_i with p = lam(G_l) / tr, differentiable: only eigenvalues
are differentiated, dL/dG = V diag(dL/dlam) V^T. The routes differ in how the solver is called:

    "float32"   torch.linalg.eigvalsh in float32, one call per size group (same-size matrices stacked)
    "float64"   the same in float64 (on CUDA: cuSOLVER syevd, measured faster than float32's syevj)
    "host"      float64 LAPACK eigh on the CPU, one thread per matrix; the gradient is formed on the device
    "padded"    every G_l zero-padded to k = max k_l and solved in ONE float64 eigvalsh call
    "batched32" / "batched64"   the padded stack in ONE direct cuSOLVER batched call
                (cusolver_batched: XsyevBatched / syevjBatched), float32 / float64, no host sync
    "auto"      float32 on a CPU; on CUDA each route is checked against float64 LAPACK and timed once
                on the first SES step's real matrices (forward + backward), the fastest kept.

Padding is exact: [[G, 0], [0, 0]] has the eigenvalues of G plus k - k_l zeros, and 0 log 0 = 0.
Because G is PSD those zeros are the k - k_l smallest eigenvalues, so the solver's round-off there
is set to exactly 0 (the gradient passes through unchanged, so every zero eigenvalue, padded or
G's own, gets the same gradient and dL/dG is the same as unpadded).
Host syncs: torch's eigvalsh on CUDA reads its convergence flags on the host once per call (per size
group; once for "padded"); "host" copies the Grams to the CPU; "batched*" never wait for the host.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

import cusolver_batched

SOLVERS = ("auto", "float32", "float64", "host", "padded", "batched32", "batched64")
PADDED = ("padded", "batched32", "batched64")
AUTO_TOLERANCE = 1e-3  # nats: a route whose H differs more from float64 LAPACK's is not used
_HOST_POOL: ThreadPoolExecutor | None = None


class _EigvalshBy(torch.autograd.Function):
    """Eigenvalues (B, k) float32 of symmetric (B, k, k) float32 by `solve(gram) -> (lam, V)`;
    backward on the device: dL/dA = V diag(dL/dlam) V^T."""

    @staticmethod
    def forward(ctx, gram, solve):
        lam, vec = solve(gram.detach())
        ctx.save_for_backward(vec)
        return lam

    @staticmethod
    def backward(ctx, grad_lam):
        (vec,) = ctx.saved_tensors
        return (vec * grad_lam.unsqueeze(-2)) @ vec.transpose(-2, -1), None


def _host_eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    global _HOST_POOL
    if _HOST_POOL is None:
        _HOST_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="ses-eigh")
    parts = list(_HOST_POOL.map(torch.linalg.eigh, gram.to("cpu", torch.float64).unbind(0)))
    lam = torch.stack([p[0] for p in parts]).to(gram.device, torch.float32, non_blocking=True)
    vec = torch.stack([p[1] for p in parts]).to(gram.device, torch.float32, non_blocking=True)
    return lam, vec


def _cusolver_eigh(dtype):
    def solve(gram):
        w, v, info = cusolver_batched.eigh_batched(gram.to(dtype))
        w = torch.where(info.eq(0).unsqueeze(-1), w, torch.full_like(w, math.nan))  # failed solve -> NaN, no sync
        return w.float(), v.float()
    return solve


def eigvals_psd(gram: torch.Tensor, solver: str = "float32") -> torch.Tensor:
    """Ascending eigenvalues (B, k) float32 of symmetric PSD (B, k, k) float32, by route `solver`."""
    if solver == "float32":
        return torch.linalg.eigvalsh(gram)
    if solver in ("float64", "padded"):
        return torch.linalg.eigvalsh(gram.double()).float()
    if solver == "host":
        return _EigvalshBy.apply(gram, _host_eigh)
    if solver in ("batched32", "batched64"):
        return _EigvalshBy.apply(gram, _cusolver_eigh(torch.float32 if solver == "batched32" else torch.float64))
    raise ValueError(f"unknown SES solver {solver!r}; use one of {', '.join(SOLVERS)}")


_PAD_MASKS: dict[tuple, torch.Tensor] = {}


def _pad_mask(sizes: tuple[int, ...], k: int, device: torch.device) -> torch.Tensor:
    """(B, k) bool, True at the k - k_l smallest slots of matrix l; built once per shape and device."""
    key = (sizes, k, str(device))
    if key not in _PAD_MASKS:
        idx = torch.arange(k, device=device)
        _PAD_MASKS[key] = torch.stack([idx < k - s for s in sizes])  # Python ints: no host->device copy
    return _PAD_MASKS[key]


def entropy_of_gram(gram: torch.Tensor, solver: str = "float32", sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Spectral entropy (B,) of PSD (B, k, k) float32; `sizes`: each matrix's size before zero-padding."""
    finite = torch.isfinite(gram).all(-1, keepdim=True).all(-2, keepdim=True)
    gram = torch.where(finite, gram, torch.zeros_like(gram))  # the solver never sees NaN/inf
    lam = eigvals_psd(gram, solver).clamp_min(0.0)
    if sizes is not None:  # the k - k_l smallest eigenvalues are the padding's exact zeros
        lam = lam - (lam * _pad_mask(tuple(sizes), gram.shape[-1], gram.device)).detach()
    total = lam.sum(-1, keepdim=True)
    p = lam / total.clamp_min(torch.finfo(torch.float32).tiny)
    positive = ~(p <= 0)  # NaN (a failed solve) counts as positive: it must reach the loss, not read as 0
    # where() keeps the gradient finite at p = 0 (d/dp p log p diverges there).
    plogp = torch.where(positive, p * torch.log(torch.where(positive, p, torch.ones_like(p))),
                        torch.zeros_like(p))
    return -plogp.sum(-1)


def _groups(grams: Sequence[torch.Tensor]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(grams):
        groups.setdefault(g.shape[-1], []).append(i)
    return groups


def entropies_of_grams(grams: Sequence[torch.Tensor], solver: str = "float32") -> list[torch.Tensor]:
    """H (0-d float32 each) of (k_l, k_l) PSD matrices: one solver call per size, or one in all (PADDED)."""
    if solver in PADDED:
        sizes = [g.shape[-1] for g in grams]
        k = max(sizes)
        stack = torch.stack([F.pad(g, (0, k - s, 0, k - s)) for g, s in zip(grams, sizes)])
        return list(entropy_of_gram(stack, solver, sizes if min(sizes) < k else None).unbind(0))
    hs: list[torch.Tensor | None] = [None] * len(grams)
    for idx in _groups(grams).values():
        h = entropy_of_gram(torch.stack([grams[i] for i in idx]), solver)
        for j, i in enumerate(idx):
            hs[i] = h[j]
    return hs  # type: ignore[return-value]


def unavailable(solver: str, device: torch.device) -> str:
    """Why route `solver` cannot run on `device` ('' if it can): only the batched cuSOLVER routes can't."""
    return cusolver_batched.available(device) if solver in ("batched32", "batched64") else ""


def time_route(grams: Sequence[torch.Tensor], solver: str, repeats: int = 3) -> tuple[float, list[torch.Tensor]]:
    """Best seconds of forward + backward of route `solver` on copies of `grams` (rep 0 warms up), and its H."""
    best, hs = math.inf, []
    device = grams[0].device
    for rep in range(repeats + 1):
        leaves = [g.detach().clone().requires_grad_(True) for g in grams]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.enable_grad():  # SES picks its route inside no_grad()
            hs = entropies_of_grams(leaves, solver)
            torch.stack(hs).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if rep:
            best = min(best, time.perf_counter() - t0)
    return best, [h.detach() for h in hs]


def compare_routes(grams: Sequence[torch.Tensor], routes: Sequence[str] = SOLVERS[1:],
                   repeats: int = 3) -> tuple[dict[str, float], dict[str, str]]:
    """Seconds (forward + backward) of each route whose H agrees with float64 LAPACK's within
    AUTO_TOLERANCE nats, and why each other route was left out (unavailable, failed, or off)."""
    with torch.no_grad():
        reference = torch.stack(entropies_of_grams([g.detach() for g in grams], "host")).double()
    timings, rejected = {}, {}
    for solver in routes:
        why = unavailable(solver, grams[0].device)
        if not why:
            try:
                seconds, hs = time_route(grams, solver, repeats)
                err = (torch.stack(hs).double() - reference).abs().max().item()
                if err <= AUTO_TOLERANCE:
                    timings[solver] = seconds
                else:
                    why = f"H differs from float64 LAPACK by {err:.2g} nats"
            except (RuntimeError, ValueError, OSError) as e:  # a CusolverError is a RuntimeError
                why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if why:
            rejected[solver] = why
    return timings, rejected


def pick_solver(grams: Sequence[torch.Tensor], repeats: int = 3) -> tuple[str, dict[str, float], dict[str, str]]:
    """(the route "auto" uses, seconds per route, why a route was left out): float32 on a CPU, where
    nothing is timed; on CUDA the fastest route of compare_routes on these (the real) matrices."""
    if not grams or grams[0].device.type != "cuda":
        return "float32", {}, {}
    timings, rejected = compare_routes(grams, SOLVERS[1:], repeats)
    return (min(timings, key=timings.get) if timings else "float64"), timings, rejected


def common_route(per_rank: Sequence[dict[str, float]]) -> str | None:
    """Several processes (torchrun): the route every rank can use that is fastest on its slowest rank,
    from each rank's pick_solver timings; None if they share none (or timed nothing: a CPU)."""
    shared = set.intersection(*(set(t) for t in per_rank)) if per_rank else set()
    return min(sorted(shared), key=lambda r: max(t[r] for t in per_rank)) if shared else None
