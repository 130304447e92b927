"""The activation collector under the SES penalty (ses_core.py): forward hooks on named modules that
store each module's output, pooled to (n, d) in the hook, for the current step.

In-hook pooling is what keeps SES's memory small: a conv output (n, C, H, W) becomes its mean over
H, W, a token output (n, T, D) its mean over T, and only that (n, d) tensor (with its graph) is kept.
Evaluation runs with the collector disabled (it stores nothing then); ses_core.SES enables it on the
steps where the penalty is due and empties it after every step.
"""
from __future__ import annotations

import contextlib
import difflib
import weakref
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn as nn

__all__ = ["pool_activation", "named_modules_checked", "ActivationCollector"]


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

    Disabled collectors store nothing (evaluation always runs disabled: an enabled collector would
    keep every eval batch's pooled output until the next clear, and run out of memory).
    `.activations` is an OrderedDict in hook order; `clear()` empties it, `remove()` detaches every
    hook. If a module runs twice in one forward, the later output wins (tap distinct modules instead). A global average pool (AdaptiveAvgPool2d to 1x1)
    whose input is the output of another hooked module has, pooled, exactly that module's pooled
    activation (the mean over H, W either way): it stores the same tensor object, which
    ses_core.spectral_entropies solves once (ResNet `all`: layer4.1 and avgpool).
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
