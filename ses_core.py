"""Spectral Entropy Shaping (SES), top to bottom: the entropy of a spectrum, the entropy of a layer's
activations, the targets, the penalty, periodic SES.

For a hooked layer l with pooled activations a of shape (n, d_l):

    X = a - mean(a, 0)                    centred batch, (n, d)
    Sigma = X^T X / (n - 1)               covariance, (d, d); eigenvalues lam_i >= 0
    p_i = lam_i / sum_j lam_j             normalised spectrum (scale-free: the 1/(n-1) cancels)
    H_l = -sum_i p_i log p_i              spectral entropy in nats, 0 <= H_l <= log(min(n - 1, d))
    t_l = beta * log d_l                  the target ("logd", the paper's; "rank": beta * log min(d_l, n - 1))
    R = sum_l (H_l - t_l)^2               the SES penalty; training loss = CE + lam * R
    periodic SES                          the penalty only on steps with step % every == 0

Gram identity: the non-zero eigenvalues of X^T X (d x d) and X X^T (n x n) coincide, so the
entropy is computed on whichever matrix is smaller (ResNet-50 layer4: n = 256 << d = 2048).
Float32 rule: the Gram/covariance math runs in float32 (or float64) with autocast disabled, whatever
dtype the activations come in (bf16/fp16 under AMP). Only eigenvalues are differentiated (the
gradient of lam_i w.r.t. the matrix is v_i v_i^T), never eigenvectors, so the gradient is stable even
with repeated eigenvalues. Round-off negatives are clamped to 0, 0 log 0 = 0, and an all-zero
spectrum gives H = 0 with finite gradients. A matrix with a NaN/inf entry (overflowed activations)
is replaced by zeros before the solver (H = 0; the non-finite CE then stops the run), so the solver
never sees one.

Where the pieces live: the activations come from the collector (ses_hooks/collector.py: forward
hooks that pool each hooked module's output in the hook; ActivationCollector is re-exported here);
the eigenvalues of the stack of Grams from ses_solvers/routes.py, by the route `solver=` names (all
exact). SES solves by the one route it is given (default "float32", plain torch.linalg.eigvalsh);
which route a sweep uses is decided once per process before any run starts (ses_solvers/decision.py;
harness/solver_route.py under torchrun), so a training step times nothing and starts no process. The
route is checkpointed (state_dict); a resumed run solves by the route it is given, and the caller
records a change in `solver_changes`. Every other argument of SES is a run setting of the harness's
table (harness/settings.py, entries with to="SES"), passed by keyword: a new SES option is one entry
there and its use here (docs/architecture.md, "Change the method").
Host synchronisation: torch's eigvalsh routes wait once per solver call (it reads its convergence
flags on the host: there is no eigvalsh_ex), "host" copies the Grams to the CPU, the batched cuSOLVER
routes make no host read of their own (cuSOLVER may work on the host when it asks for host
workspace). The code here adds no other sync.
Under torch.compile the collector cannot see that avgpool's input is a hooked block's output (no
id()/weakref in a graph): ResNet `all` then solves 9 matrices per SES step, not 8 (the same H).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from ses_hooks.collector import ActivationCollector, named_modules_checked, pool_activation
from ses_solvers.routes import ROUTES, eigenvalues

__all__ = ["entropy_of_spectrum", "spectral_entropy", "spectral_entropies", "centred_grams", "TARGETS",
           "entropy_ceiling", "entropy_target", "ses_penalty", "check_beta", "check_lam", "check_every",
           "check_target", "SES", "ActivationCollector", "pool_activation", "named_modules_checked"]


# ----------------------------------------------------------------------------- 1. the entropy of a spectrum
def entropy_of_spectrum(lam: torch.Tensor) -> torch.Tensor:
    """H = -sum_i p_i log p_i (nats) of each row of eigenvalues lam (..., k) -> (...), differentiable.

    Round-off negatives are clamped to 0 and p = lam / sum(lam). 0 log 0 = 0, so zeros anywhere in a
    row (a rank-deficient layer, the solver's zero padding) change nothing; an all-zero row gives H = 0
    with finite gradients (the sum is clamped to float32's smallest normal number before dividing). A
    NaN eigenvalue (a failed solve) counts as positive: it reaches the loss and stops the run, it is
    never read as 0.
    """
    lam = lam.clamp_min(0.0)
    p = lam / lam.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    positive = ~(p <= 0)
    # where() keeps the gradient finite at p = 0 (d/dp p log p diverges there).
    plogp = torch.where(positive, p * torch.log(torch.where(positive, p, torch.ones_like(p))), torch.zeros_like(p))
    return -plogp.sum(-1)


# ----------------------------------------------------------------------------- 2. the entropy of activations
def _centred_gram(a: torch.Tensor) -> torch.Tensor:
    """(n, d) activations -> float32 Gram (n x n) or covariance (d x d), whichever is smaller; zeros if
    any entry is NaN/inf (the solver never sees one)."""
    x = a.float()
    x = x - x.mean(0, keepdim=True)
    n, d = x.shape
    gram = x @ x.T if n < d else x.T @ x
    return torch.where(torch.isfinite(gram).all(), gram, torch.zeros_like(gram))


def centred_grams(activations: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The float32 Gram (or covariance, whichever is smaller) of each distinct (n, d) tensor in
    `activations`, in order of first appearance, autocast off: the matrices spectral_entropies solves
    (the same tensor object given twice, an aliased hook, counts once)."""
    unique = list({id(a): a for a in activations}.values())
    with torch.autocast(device_type=unique[0].device.type, enabled=False):
        return [_centred_gram(a) for a in unique]


def spectral_entropies(activations: Sequence[torch.Tensor], solver: str = "float32") -> list[torch.Tensor]:
    """H (0-d float32, differentiable) of every (n, d) tensor in `activations`, in order.

    The same tensor object given twice (an aliased hook, see ActivationCollector) is solved once and
    gets the same H object. The eigenvalues come from ses_solvers.routes.eigenvalues: one batched
    call per matrix size (ResNet-18's `all` hooks: sizes 64, 128, 256 -> three calls; ResNet-50's:
    one), or one call for all sizes on the padded routes.
    """
    if not activations:
        return []
    index = {key: i for i, key in enumerate(dict.fromkeys(id(a) for a in activations))}
    with torch.autocast(device_type=activations[0].device.type, enabled=False):
        hs = entropy_of_spectrum(eigenvalues(centred_grams(activations), solver)).unbind(0)
    return [hs[index[id(a)]] for a in activations]


def spectral_entropy(a: torch.Tensor) -> torch.Tensor:
    """Spectral entropy H (nats, 0-d float32, differentiable) of activations `a` of shape (n, d)."""
    if a.dim() != 2:
        raise ValueError(f"spectral_entropy expects an (n, d) tensor, got shape {tuple(a.shape)}")
    return spectral_entropies([a])[0]


# ----------------------------------------------------------------------------- 3. the targets
TARGETS = ("logd", "rank")


def check_target(target: str) -> str:
    """Return target, or raise ValueError unless it is one of TARGETS."""
    if target not in TARGETS:
        raise ValueError(f"unknown ses_target {target!r}; use {' or '.join(TARGETS)}")
    return target


def entropy_ceiling(d: int, n: int) -> float:
    """The highest H a centred batch of n rows in d dimensions can reach: rank <= min(d, n - 1)."""
    return math.log(max(min(d, n - 1), 1))


def entropy_target(d: int, n: int, beta: float, mode: str = "logd") -> float:
    """beta * log d (the paper's target, 'logd'), or beta * log min(d, n - 1) ('rank': reachable)."""
    return beta * (math.log(d) if check_target(mode) == "logd" else entropy_ceiling(d, n))


# ----------------------------------------------------------------------------- 4. the penalty
def check_beta(beta: float) -> float:
    """Return beta as a float, or raise ValueError unless 0 < beta < 1."""
    beta = float(beta)
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in the open interval (0, 1), got {beta}")
    return beta


def check_lam(lam: float) -> float:
    """Return lam as a float, or raise ValueError unless it is a finite number >= 0."""
    if not (lam >= 0 and math.isfinite(lam)):
        raise ValueError(f"lam (the SES weight) must be a finite number >= 0, got {lam}")
    return float(lam)


def check_every(every: int) -> int:
    """Return every as an int, or raise ValueError unless it is an integer >= 1."""
    if int(every) != every or every < 1:
        raise ValueError(f"every (the SES period k) must be an integer >= 1, got {every}")
    return int(every)


_TARGETS: dict[tuple, torch.Tensor] = {}


def _penalty_terms(acts: Sequence[torch.Tensor], beta: float, solver: str = "float32", target: str = "logd"):
    """(R, (L,) stacked H_l) for a list of L (n, d_l) tensors. The (L,) targets are computed on the host
    each call and copied to the device once per distinct set of values (that first copy waits for the
    device; later steps reuse it)."""
    if not acts:
        raise ValueError("no activations to penalise: is the collector enabled and hooked?")
    hs = torch.stack(spectral_entropies(acts, solver))
    key = (tuple(entropy_target(a.shape[1], a.shape[0], beta, target) for a in acts), str(hs.device))
    if key not in _TARGETS:  # keyed by the target values themselves: whatever decides them, never a stale one
        _TARGETS[key] = torch.tensor(key[0], device=hs.device)
    gap = hs - _TARGETS[key]  # H_l - t_l
    return (gap ** 2).sum(), hs


def ses_penalty(activations: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
                beta: float, solver: str = "float32", target: str = "logd") -> torch.Tensor:
    """R = sum_l (H_l - t_l)^2 over (n, d_l) tensors (a mapping name -> tensor, or a list)."""
    acts = list(activations.values()) if isinstance(activations, Mapping) else list(activations)
    return _penalty_terms(acts, check_beta(beta), solver, check_target(target))[0]


# ----------------------------------------------------------------------------- 5. periodic SES
class SES:
    """Periodic SES: on steps with step % every == 0 the hooks collect and lam * R is returned.

    Per training step:
        ses.begin_step()                       # enables the hooks on due steps
        logits = model(x)
        loss = ce + ses.penalty()              # lam * R on due steps, 0.0 otherwise
    Other steps cost what a plain CE step costs. `applied_steps` counts the steps where the
    penalty was applied; `last_entropy` holds the last per-layer H (detached, on the device), and
    `epoch_entropy()` the per-layer mean of the penalised H since its last call (summed on the
    device; its one host sync happens there, once per epoch). `solver` is the route every SES step
    solves by, as given: a step never times a route or starts a process.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], lam: float = 0.01,
                 beta: float = 0.7, every: int = 1, solver: str = "float32", target: str = "logd"):
        if solver not in ROUTES:
            raise ValueError(f"unknown SES solver route {solver!r}; use one of {', '.join(ROUTES)} (a sweep "
                             f"turns 'auto' into one of them before it starts: ses_solvers.decision.decide)")
        self.lam, self.beta, self.every, self.solver = check_lam(lam), check_beta(beta), check_every(every), solver
        self.target = check_target(target)
        self.solver_changes: list[str] = []  # "epoch N: <old> -> <new> (<why>)", one per resume onto another route
        self.collector = ActivationCollector(model, layers, enabled=False)
        self.step = 0            # training steps seen so far
        self.applied_steps = 0   # steps on which the penalty was added
        self.last_entropy: dict[str, torch.Tensor] = {}
        self.gather = None  # (n_local, d) -> (n_global, d), differentiable; set for multi-process runs
        self._entropy_names: list[str] = []
        self._entropy_sum: torch.Tensor | None = None  # (L,) sum of the penalised H since epoch_entropy()
        self._entropy_steps = 0

    def begin_step(self) -> bool:
        """Enable the hooks if this step is due; return whether it is."""
        due = self.step % self.every == 0
        if due:
            self.collector.clear()
            self.collector.enable()
        return due

    def penalty(self) -> torch.Tensor | float:
        """lam * R for a due step (hooks then disabled and emptied), else 0.0. Advances the step."""
        due = self.collector.enabled
        self.step += 1
        if not due:
            return 0.0
        acts = self.collector.activations
        if self.gather is not None:  # several processes: SES on the global batch (harness.multigpu.gather_rows)
            pooled = {}
            for a in acts.values():  # an aliased tensor (avgpool = layer4.1) is gathered once, solved once
                if id(a) not in pooled:
                    pooled[id(a)] = self.gather(a)
            acts = {n: pooled[id(a)] for n, a in acts.items()}
        r, hs = _penalty_terms(list(acts.values()), self.beta, self.solver, self.target)
        hs = hs.detach()
        self.last_entropy = dict(zip(acts, hs.unbind(0)))
        self._entropy_names = list(acts)  # the same layers on every SES step
        self._entropy_sum = hs if self._entropy_sum is None else self._entropy_sum + hs
        self._entropy_steps += 1
        self.collector.disable()
        self.applied_steps += 1
        return self.lam * r

    def epoch_entropy(self) -> dict[str, float]:
        """Mean train-mode H per layer over the penalised steps since the last call ({} if none); resets."""
        means = (self._entropy_sum / self._entropy_steps).tolist() if self._entropy_sum is not None else []
        self._entropy_sum, self._entropy_steps = None, 0
        return dict(zip(self._entropy_names, means))

    def state_dict(self) -> dict:
        """The step counters, the route and its changes on earlier resumes."""
        return {"step": self.step, "applied_steps": self.applied_steps, "solver": self.solver,
                "solver_changes": list(self.solver_changes)}

    def load_state_dict(self, state: Mapping) -> str | None:
        """Restore the step counters and the route changes; return the route `state` was saved with (None
        if it names none). This SES keeps solving by its own route: a caller resuming onto another one
        appends the change to solver_changes."""
        self.step, self.applied_steps = int(state["step"]), int(state["applied_steps"])
        saved = state.get("solver")
        if isinstance(saved, Mapping):  # a checkpoint that also held the timings of the route choice
            self.solver_changes, saved = list(saved.get("changes", [])), saved.get("route")
        else:
            self.solver_changes = list(state.get("solver_changes", []))
        return saved if saved in ROUTES else None

    def remove(self) -> None:
        self.collector.remove()
