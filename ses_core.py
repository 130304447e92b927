"""Spectral Entropy Shaping (SES): the penalty, the activation collector, periodic SES.

For a hooked layer l with pooled activations a of shape (n, d_l):

    X = a - mean(a, 0)                    centred batch, (n, d)
    Sigma = X^T X / (n - 1)               covariance, (d, d); eigenvalues lam_i >= 0
    p_i = lam_i / sum_j lam_j             normalised spectrum (scale-free: the 1/(n-1) cancels)
    H_l = -sum_i p_i log p_i              spectral entropy in nats, 0 <= H_l <= log(min(n - 1, d))
    R = sum_l (H_l - beta * log d_l)^2    the SES penalty; training loss = CE + lam * R

Gram identity: the non-zero eigenvalues of X^T X (d x d) and X X^T (n x n) coincide, so the
entropy is computed on whichever matrix is smaller (ResNet-50 layer4: n = 256 << d = 2048).
Float32 rule: the Gram/covariance math runs in float32 (or float64) with autocast disabled, whatever
dtype the activations come in (bf16/fp16 under AMP). Only eigenvalues are differentiated (the
gradient of lam_i w.r.t. the matrix is v_i v_i^T), never eigenvectors, so the gradient is stable even
with repeated eigenvalues. Round-off negatives are clamped to 0, 0 log 0 = 0, and an all-zero
spectrum gives H = 0 with finite gradients. A matrix with a NaN/inf entry (overflowed activations)
is replaced by zeros before the solver (H = 0; the non-finite CE then stops the run), so the solver
never sees one.

Solver routes (all exact; `solver=` of SES / spectral_entropies): see ses_solvers/routes.py. SES solves
by the one route it is given (default "float32", plain torch.linalg.eigvalsh); which route a sweep
uses is decided once per process before any run starts (ses_solvers/decision.py; harness/solver_route.py
under torchrun), so a training step times nothing and starts no process. The route is checkpointed
(state_dict); a resumed run solves by the route it is given, and the caller records a change in
`solver_changes`.
Host synchronisation: torch's eigvalsh routes wait once per solver call (it reads its convergence
flags on the host: there is no eigvalsh_ex), "host" copies the Grams to the CPU, the batched cuSOLVER
routes make no host read of their own (cuSOLVER may work on the host when it asks for host
workspace). The code here adds no other sync.
Under torch.compile the collector cannot see that avgpool's input is a hooked block's output (no
id()/weakref in a graph): ResNet `all` then solves 9 matrices per SES step, not 8 (the same H).
"""
from __future__ import annotations

import contextlib
import difflib
import math
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from ses_solvers.routes import ROUTES, entropies_of_grams, entropy_of_gram

__all__ = ["entropy_ceiling", "entropy_target", "spectral_entropy", "spectral_entropies", "centred_grams", "ses_penalty",
           "pool_activation", "named_modules_checked", "ActivationCollector", "SES", "check_beta"]


def check_beta(beta: float) -> float:
    """Return beta as a float, or raise ValueError unless 0 < beta < 1."""
    beta = float(beta)
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in the open interval (0, 1), got {beta}")
    return beta


def _centred_gram(a: torch.Tensor) -> torch.Tensor:
    """(n, d) activations -> float32 Gram (n x n) or covariance (d x d), whichever is smaller."""
    x = a.float()
    x = x - x.mean(0, keepdim=True)
    n, d = x.shape
    return x @ x.T if n < d else x.T @ x


def spectral_entropy(a: torch.Tensor) -> torch.Tensor:
    """Spectral entropy H (nats, 0-d float32, differentiable) of activations `a` of shape (n, d)."""
    if a.dim() != 2:
        raise ValueError(f"spectral_entropy expects an (n, d) tensor, got shape {tuple(a.shape)}")
    with torch.autocast(device_type=a.device.type, enabled=False):
        return entropy_of_gram(_centred_gram(a).unsqueeze(0))[0]


def centred_grams(activations: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The float32 Gram (or covariance, whichever is smaller) of each distinct (n, d) tensor in
    `activations`, in order of first appearance, autocast off: the matrices spectral_entropies solves
    (the same tensor object given twice, an aliased hook, counts once)."""
    unique = list({id(a): a for a in activations}.values())
    with torch.autocast(device_type=unique[0].device.type, enabled=False):
        return [_centred_gram(a) for a in unique]


def spectral_entropies(activations: Sequence[torch.Tensor], solver: str = "float32") -> list[torch.Tensor]:
    """H of every (n, d) tensor in `activations`, in order.

    The same tensor object given twice (an aliased hook, see ActivationCollector) is solved once.
    Matrices of equal size are stacked and decomposed in one batched call per size (ResNet-18's
    `all` hooks: sizes 64, 128, 256 -> three calls; ResNet-50's: one); the padded routes make one
    call for all sizes.
    """
    if not activations:
        return []
    index = {key: i for i, key in enumerate(dict.fromkeys(id(a) for a in activations))}
    with torch.autocast(device_type=activations[0].device.type, enabled=False):
        hs = entropies_of_grams(centred_grams(activations), solver)
    return [hs[index[id(a)]] for a in activations]  # type: ignore[misc]


TARGETS = ("logd", "rank")


def entropy_ceiling(d: int, n: int) -> float:
    """The highest H a centred batch of n rows in d dimensions can reach: rank <= min(d, n - 1)."""
    return math.log(max(min(d, n - 1), 1))


def entropy_target(d: int, n: int, beta: float, mode: str = "logd") -> float:
    """beta * log d (the paper's target, 'logd'), or beta * log min(d, n - 1) ('rank': reachable)."""
    if mode not in TARGETS:
        raise ValueError(f"unknown ses_target {mode!r}; use logd or rank")
    return beta * (math.log(d) if mode == "logd" else entropy_ceiling(d, n))


_TARGETS: dict[tuple, torch.Tensor] = {}


def _penalty_terms(acts: Sequence[torch.Tensor], beta: float, solver: str = "float32", target: str = "logd"):
    """(R, (L,) stacked H_l) for a list of L (n, d_l) tensors. The (L,) targets are copied to the
    device once per shape set (that first copy waits for the device; later steps reuse it)."""
    if not acts:
        raise ValueError("no activations to penalise: is the collector enabled and hooked?")
    hs = torch.stack(spectral_entropies(acts, solver))
    key = (tuple(tuple(a.shape) for a in acts), beta, target, str(hs.device))
    if key not in _TARGETS:
        _TARGETS[key] = torch.tensor([entropy_target(a.shape[1], a.shape[0], beta, target) for a in acts],
                                     device=hs.device)
    return ((hs - _TARGETS[key]) ** 2).sum(), hs


def ses_penalty(activations: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
                beta: float, solver: str = "float32") -> torch.Tensor:
    """R = sum_l (H_l - beta * log d_l)^2 over (n, d_l) tensors (a mapping name -> tensor, or a list)."""
    acts = list(activations.values()) if isinstance(activations, Mapping) else list(activations)
    return _penalty_terms(acts, check_beta(beta), solver)[0]


def pool_activation(out: torch.Tensor) -> torch.Tensor:
    """In-hook pooling: (n, C, H, W) -> mean over H, W; (n, T, D) -> mean over T; (n, d) kept."""
    if out.dim() == 4:
        return out.mean(dim=(2, 3))
    if out.dim() == 3:
        return out.mean(dim=1)
    if out.dim() == 2:
        return out
    raise ValueError(f"cannot pool an activation of shape {tuple(out.shape)} to (n, d)")


def _is_global_pool(module: nn.Module) -> bool:
    return isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1))


def named_modules_checked(model: nn.Module, layer_names: Sequence[str]) -> dict[str, nn.Module]:
    """model.named_modules() as a dict; an unknown name raises ValueError naming it and the nearest names."""
    modules = dict(model.named_modules())
    for name in layer_names:
        if name not in modules:
            near = difflib.get_close_matches(name, [k for k in modules if k], n=5, cutoff=0.5)
            hint = f"; nearest: {', '.join(near)}" if near else ""
            raise ValueError(f"unknown layer name {name!r}{hint}")
    return modules


class ActivationCollector:
    """Forward hooks on named modules that store each module's pooled (n, d) output, graph kept.

    Disabled collectors store nothing (evaluation must always run disabled: storing activations
    in an eval pass was an OOM bug). `.activations` is an OrderedDict in hook order; `clear()`
    empties it, `remove()` detaches every hook. If a module runs twice in one forward, the later
    output wins (tap distinct modules instead). A global average pool (AdaptiveAvgPool2d to 1x1)
    whose input is the output of another hooked module has, pooled, exactly that module's pooled
    activation (the mean over H, W either way): it stores the same tensor object, which
    spectral_entropies solves once (ResNet `all`: layer4.1 and avgpool).
    """

    def __init__(self, model: nn.Module, layer_names: Sequence[str], enabled: bool = True):
        modules = named_modules_checked(model, layer_names)
        self.layer_names = list(layer_names)
        self.enabled = enabled
        self.activations: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._by_output: dict[int, tuple] = {}
        self._handles = [modules[n].register_forward_hook(self._hook(n, _is_global_pool(modules[n])))
                         for n in self.layer_names]

    def _hook(self, name: str, global_pool: bool):
        def hook(module, inputs, output):
            if not self.enabled:
                return
            out = output[0] if isinstance(output, (tuple, list)) else output
            if torch.compiler.is_compiling():  # torch.compile: no id()/weakref aliasing (they break the graph)
                self.activations[name] = pool_activation(out)
                return
            src = inputs[0] if inputs else None
            seen = self._by_output.get(id(src)) if global_pool and torch.is_tensor(src) else None
            if seen is not None and seen[0]() is src:
                self.activations[name] = seen[1]
                return
            pooled = pool_activation(out)
            self.activations[name] = pooled
            self._by_output[id(out)] = (weakref.ref(out), pooled)
        return hook

    def enable(self) -> None:
        self.enabled = True

    def disable(self) -> None:
        self.enabled = False
        self.clear()

    @contextlib.contextmanager
    def paused(self):
        """Disable (and empty) the collector inside the block; restore the previous state after."""
        was = self.enabled
        self.disable()
        try:
            yield self
        finally:
            self.enabled = was

    def clear(self) -> None:
        self.activations.clear()
        self._by_output.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.disable()


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
        if not (lam >= 0 and math.isfinite(lam)):
            raise ValueError(f"lam (the SES weight) must be a finite number >= 0, got {lam}")
        if int(every) != every or every < 1:
            raise ValueError(f"every (the SES period k) must be an integer >= 1, got {every}")
        if solver not in ROUTES:
            raise ValueError(f"unknown SES solver route {solver!r}; use one of {', '.join(ROUTES)} (a sweep "
                             f"turns 'auto' into one of them before it starts: ses_solvers.decision.decide)")
        if target not in TARGETS:
            raise ValueError(f"unknown ses_target {target!r}; use logd or rank")
        self.lam, self.beta, self.every, self.solver = float(lam), check_beta(beta), int(every), solver
        self.target = target
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
