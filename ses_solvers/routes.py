"""The exact eigen-solve under the SES penalty: the eigenvalues of a stack of Gram matrices by one of
several routes, and the measurement that compares the routes (decision.py decides which one a process
trains with). What is computed from the eigenvalues (the spectral entropy) is the method's, in ses_core.

Given m symmetric PSD float32 matrices G_l (k_l x k_l, one per hooked layer, see ses_core),
eigenvalues(grams, solver) returns one (m, k) float32 tensor, k = max k_l: row l holds the k_l
eigenvalues of G_l and k - k_l exact zeros (where in the row depends on the route). They are
differentiable: only eigenvalues are differentiated, dL/dG = V diag(dL/dlam) V^T. The routes differ
in how the solver is called:

    "float32"   torch.linalg.eigvalsh in float32, one call per size group (same-size matrices stacked)
    "float64"   the same in float64
    "host"      float64 LAPACK eigh on the CPU, the matrices spread over a pool of 8 threads; the
                gradient is formed on the device
    "padded"    every G_l zero-padded to k = max k_l and solved in ONE float64 eigvalsh call
    "batched32" / "batched64"   the padded stack in ONE direct cuSOLVER batched call
                (cusolver_batched: XsyevBatched / syevjBatched), float32 / float64
SOLVERS adds "auto" (what a user may ask for: decision.decide turns it into one of ROUTES before any
training step).

What torch's eigvalsh does on CUDA depends on its version. torch >= 2.12 sends every batched input to
one cusolverDnXsyevBatched call (PR 175403): "float32" is then one batched call per size group,
"padded" one call in all, and "batched*" differ from them only by torch's host read of `info`.
torch <= 2.11 loops single-matrix syevj (float32) / syevd (float64) over the batch for sizes 33-512
(only k <= 32 is batched), so "float32" costs one solver call per matrix and "batched*" replace B
calls by one.

Padding is exact: [[G, 0], [0, 0]] has the eigenvalues of G plus k - k_l zeros. Because G is PSD
those zeros are the k - k_l smallest eigenvalues, so the solver's round-off there is set to exactly
0 (the gradient passes through unchanged, so every zero eigenvalue, padded or G's own, gets the same
gradient and dL/dG is the same as unpadded). The per-size routes pad their rows with zeros too, so
every route returns the same (m, k) layout.
Host syncs: torch's eigvalsh on CUDA reads its convergence flags on the host once per call (per size
group; once for "padded"); "host" copies the Grams to the CPU; "batched*" make no host read of their
own (cuSOLVER may still work on the host when it asks for host workspace: see cusolver_batched).

Comparing the routes (compare_routes; --preflight runs it on a config's real matrices, bench/bench_ses.py
times with time_route; never inside training). The caller passes `of_spectrum`, what it computes from
the eigenvalues, (m, k) -> (m,): SES passes its spectral entropy H (ses_core.entropy_of_spectrum), so
the check is in nats and the messages name H. Every route is checked against float64 LAPACK (off by
more than EXACT_TOLERANCE, failing or unavailable: left out, with why), then its solve is timed:
REPS back-to-back forward + backward repetitions between two CUDA events, no sync inside (one wait on
the end event to read it), ROUNDS rounds interleaved over the routes, the median kept. choose_route
keeps "float32" (plain torch) unless another route takes at most 1 - KEEP_MARGIN = 90 % of its time;
the margin recorded is 1 - t(fastest other) / t(float32).
What this timing cannot see: what a route's host sync costs the rest of the training step. Timed
alone, a route pays only for the GPU idling inside its own repetitions; in training the sync also
costs the CPU its lead over the backward pass and the optimizer, whose launches are then exposed.
So on torch >= 2.12, where "float32" and "batched*" differ only by that sync, the rule keeps
"float32" even where "batched32" would make the step faster; bench/bench_ses.py times the training
step with each route fixed (its "k=1 <route>" rows) to show it.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from plumbing import gpu
from ses_solvers import cusolver_batched

ROUTES = ("float32", "float64", "host", "padded", "batched32", "batched64")
SOLVERS = ("auto",) + ROUTES  # what a user may name: a route, or auto (decision.decide)
PADDED = ("padded", "batched32", "batched64")
EXACT_TOLERANCE = 1e-3  # nats of H: a route whose H differs more from float64 LAPACK's is not used
KEEP_MARGIN = 0.10     # choose_route leaves "float32" only for a route that saves at least this fraction of its time
REPS, ROUNDS = 5, 3    # compare_routes: back-to-back repetitions per timing, timings per route (median kept)
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
        w, v, info = cusolver_batched.eigh_batched(gram, dtype)  # one copy of the stack, made in `dtype`
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
    raise ValueError(f"unknown SES solver route {solver!r}; use one of {', '.join(ROUTES)}")


_PAD_MASKS: dict[tuple, torch.Tensor] = {}


def _pad_mask(sizes: tuple[int, ...], k: int, device: torch.device) -> torch.Tensor:
    """(B, k) bool, True at the k - k_l smallest slots of matrix l; built once per shape and device."""
    key = (sizes, k, str(device))
    if key not in _PAD_MASKS:
        idx = torch.arange(k, device=device)
        _PAD_MASKS[key] = torch.stack([idx < k - s for s in sizes])  # Python ints: no host->device copy
    return _PAD_MASKS[key]


def _solve(gram: torch.Tensor, solver: str, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Eigenvalues (B, k) of a stack (B, k, k); `sizes`: each matrix's size before zero-padding, whose
    k - k_l smallest eigenvalues are the padding's exact zeros."""
    lam = eigvals_psd(gram, solver)
    if sizes is not None:
        lam = lam - (lam * _pad_mask(tuple(sizes), gram.shape[-1], gram.device)).detach()
    return lam


def _groups(grams: Sequence[torch.Tensor]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(grams):
        groups.setdefault(g.shape[-1], []).append(i)
    return groups


def eigenvalues(grams: Sequence[torch.Tensor], solver: str = "float32") -> torch.Tensor:
    """(m, k) float32, k = max k_l: row l holds the k_l eigenvalues of the PSD (k_l, k_l) float32 matrix
    grams[l] and k - k_l exact zeros (after them on the per-size routes, before them on the PADDED ones).
    One solver call per size, or one in all (PADDED)."""
    sizes = [g.shape[-1] for g in grams]
    k = max(sizes)
    if solver in PADDED:
        stack = torch.stack([F.pad(g, (0, k - s, 0, k - s)) for g, s in zip(grams, sizes)])
        return _solve(stack, solver, sizes if min(sizes) < k else None)
    rows: list[torch.Tensor | None] = [None] * len(grams)
    for size, idx in _groups(grams).items():
        lam = F.pad(_solve(torch.stack([grams[i] for i in idx]), solver), (0, k - size))
        for j, i in enumerate(idx):
            rows[i] = lam[j]
    return rows[0].unsqueeze(0) if len(rows) == 1 else torch.stack(rows)  # type: ignore[arg-type]


def unavailable(solver: str, device: torch.device, shape: tuple[int, int] | None = None) -> str:
    """Why route `solver` cannot run on `device` ('' if it can): only the batched cuSOLVER routes can't
    (`shape` = (B, k) of the padded stack they would solve). Never raises."""
    return cusolver_batched.available(device, shape) if solver in ("batched32", "batched64") else ""


def padded_shape(grams: Sequence[torch.Tensor]) -> tuple[int, int]:
    """(B, k) of the zero-padded stack the PADDED routes solve."""
    return len(grams), max(g.shape[-1] for g in grams)


def forward_backward(grams: Sequence[torch.Tensor], solver: str, of_spectrum) -> torch.Tensor:
    """One SES solve, forward and backward, as the penalty runs it: of_spectrum of the eigenvalues of
    fresh leaf copies of `grams` by route `solver`, then the backward pass through them; the (m,)
    values, detached. No sync beyond the route's own."""
    leaves = [g.detach().clone().requires_grad_(True) for g in grams]
    with torch.enable_grad():  # also when called inside no_grad()
        values = of_spectrum(eigenvalues(leaves, solver))
        values.sum().backward()
    return values.detach()


class _HostEvent:
    """torch.cuda.Event's timing interface on the host clock (on a CPU each op is done when it returns)."""

    def __init__(self):
        self.t = math.nan

    def record(self, stream=None) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: "_HostEvent") -> float:
        return 1e3 * (end.t - self.t)


def time_route(grams: Sequence[torch.Tensor], solver: str, of_spectrum, reps: int = REPS, event=None,
               warmup: bool = True) -> tuple[float, torch.Tensor]:
    """(seconds per forward + backward of route `solver` on copies of `grams`, the (m,) values of the
    last rep: forward_backward),
    timed alone (not what its host sync costs the rest of a training step): an untimed warm-up rep (if
    `warmup`), then `reps` back-to-back reps between two events recorded on the device's current stream,
    no sync inside, one wait on the end event to read them. `event()` makes a torch.cuda.Event-like
    object (record, synchronize, elapsed_time in ms); default CUDA timing events on CUDA, the host clock
    on a CPU."""
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    device = grams[0].device
    event = event or (gpu.timing_event if device.type == "cuda" else _HostEvent)
    with gpu.guard(device):
        values = forward_backward(grams, solver, of_spectrum) if warmup else None
        start, end = event(), event()
        start.record()
        for _ in range(reps):
            values = forward_backward(grams, solver, of_spectrum)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / reps, values


def compare_routes(grams: Sequence[torch.Tensor], of_spectrum, routes: Sequence[str] = ROUTES, reps: int = REPS,
                   rounds: int = ROUNDS, event=None) -> tuple[dict[str, float], dict[str, str]]:
    """Seconds per forward + backward (median of `rounds` time_route timings, interleaved over the
    routes) of each route whose of_spectrum values (SES: H) agree with float64 LAPACK's within
    EXACT_TOLERANCE in every round, and why each other route was left out (unavailable, failed, or
    off). A route's fault is recorded, never raised."""
    with torch.no_grad():
        reference = of_spectrum(eigenvalues([g.detach() for g in grams], "host")).double()
    samples: dict[str, list[float]] = {}
    rejected: dict[str, str] = {}
    for rnd in range(rounds):
        for solver in (r for r in routes if r not in rejected):
            try:
                why = unavailable(solver, grams[0].device, padded_shape(grams)) if rnd == 0 else ""
                if not why:
                    seconds, values = time_route(grams, solver, of_spectrum, reps, event, warmup=rnd == 0)
                    err = (values.double() - reference).abs().max().item()
                    samples.setdefault(solver, []).append(seconds)
                    why = "" if err <= EXACT_TOLERANCE else f"H differs from float64 LAPACK by {err:.2g} nats"
            except (RuntimeError, ValueError, OSError) as e:  # a CusolverError is a RuntimeError
                why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if why:
                rejected[solver] = why
                samples.pop(solver, None)
    return {s: statistics.median(t) for s, t in samples.items()}, rejected


def choose_route(timings: dict[str, float]) -> tuple[str, float | None]:
    """(route, margin) by the preflight's rule, from seconds per route: "float32" unless the fastest other route
    takes at most (1 - KEEP_MARGIN) of float32's time; margin = 1 - t(fastest other) / t(float32), None
    without both. Without a float32 time: the fastest route; with no time at all: "host" (the float64
    LAPACK reference compare_routes checks against: exact wherever it runs). Ties go to the first name in sorted
    order, so equal timings give the same route everywhere."""
    others = sorted((t, r) for r, t in timings.items() if r != "float32")
    t32 = timings.get("float32")
    if t32 is None:
        return (others[0][1] if others else "host"), None
    if not others or t32 <= 0:
        return "float32", None
    t_best, best = others[0]
    margin = 1 - t_best / t32
    return (best if t_best <= (1 - KEEP_MARGIN) * t32 else "float32"), margin


def describe_choice(route: str, timings: dict[str, float], rejected: dict[str, str], margin: float | None) -> str:
    """One line: the route, each route's ms per forward + backward, the margin against float32, what was
    left out and why."""
    parts = [", ".join(f"{r} {1e3 * t:.1f} ms" for r, t in timings.items())] if timings else []
    if margin is not None:
        parts.append(f"fastest other route takes {100 * (1 - margin):.0f} % of float32's time "
                     f"(float32 is left at <= {100 * (1 - KEEP_MARGIN):.0f} %)")
    if not timings and rejected:
        parts.append(f"no route could be timed: {route}, exact wherever it runs")
    parts += [f"{r} left out: {why}" for r, why in rejected.items()]
    return f"{route} ({'; '.join(parts)})"
