"""Models and SES hook presets: torchvision ResNets with the CIFAR stem, and name -> layer lists.

A model builder is `build(cfg, info) -> nn.Module` (cfg: the run's resolved settings, info: the
dataset's facts: num_classes, image_size, mean, std, ...). A hook preset maps a model name to
{preset name: [module names] or callable(model) -> [module names]}. Scripts bring their own models
and presets (exp13: the Perceiver) by passing them to the harness (harness/registry.py), never by writing
into these dicts.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.spectral_norm import SpectralNorm

from ses_core import named_modules_checked

# ResNet-18 `all` hooks the 8 BasicBlocks + avgpool; the pooled output of layer4.1 equals avgpool's
# (avgpool is the spatial mean of layer4.1's output), so that spectrum is counted twice: this is the
# paper's preset, kept as is. The same holds for ResNet-50's layer4.2 and avgpool.
HOOK_PRESETS: dict[str, dict] = {
    "resnet18": {"all": [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)] + ["avgpool"],
                 "last3": ["layer4.0", "layer4.1", "avgpool"]},
    "resnet50": {"layer4+avgpool": ["layer4.0", "layer4.1", "layer4.2", "avgpool"]},
}


class PixelNormalize(nn.Module):
    """(x - mean) / std per channel: models take [0, 1] pixels, so noise and FGSM act on pixels."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def build_resnet(cfg: dict, info: dict) -> nn.Module:
    """torchvision ResNet-18/50 with the CIFAR stem: conv1 3x3 stride 1 pad 1, maxpool -> Identity.

    Input (B, 3, H, W) pixels in [0, 1]; conv1 is Sequential(PixelNormalize, Conv2d), so the hook
    names (layer1.0 ... avgpool) stay torchvision's. spectral_norm=True wraps every Conv2d and
    Linear with nn.utils.spectral_norm(module, name='weight') (the paper's Exp 3 baseline).
    """
    import torchvision
    net = getattr(torchvision.models, cfg["model"])(weights=None, num_classes=info["num_classes"])
    net.conv1 = nn.Sequential(PixelNormalize(info["mean"], info["std"]),
                              nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False))
    net.maxpool = nn.Identity()
    if cfg.get("spectral_norm"):
        for m in list(net.modules()):
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                float32_spectral_norm(m)
    return net


def float32_spectral_norm(module: nn.Module) -> nn.Module:
    """nn.utils.spectral_norm(module, name='weight') whose power iteration always runs in float32.

    The SpectralNorm forward pre-hook computes u, v with torch.mv and sigma with torch.dot. Under CUDA
    autocast mv runs in bf16/fp16 and dot then mixes float32 with the low-precision vector; here the
    hook runs with autocast disabled, so u, v, sigma and the normalised weight stay float32 and the
    layer itself is still autocast like any other.
    """
    nn.utils.spectral_norm(module, name="weight")
    for key, hook in list(module._forward_pre_hooks.items()):
        if isinstance(hook, SpectralNorm):
            def in_float32(mod, inputs, _hook=hook):
                device_type = inputs[0].device.type if inputs and torch.is_tensor(inputs[0]) else "cpu"
                with torch.autocast(device_type=device_type, enabled=False):
                    return _hook(mod, inputs)
            module._forward_pre_hooks[key] = in_float32
    return module


MODEL_BUILDERS = {"resnet18": build_resnet, "resnet50": build_resnet}


class LayerError(ValueError):
    """An unknown hook preset or module name (the CLI reports it against --layers)."""


def resolve_layers(cfg: dict, model: nn.Module, presets: dict | None = None) -> list[str]:
    """A preset name of cfg['model'] (list, or callable(model) -> list), or comma-separated names."""
    spec = cfg["layers"]
    known = (HOOK_PRESETS if presets is None else presets).get(cfg["model"], {})
    if isinstance(spec, str) and spec in known:
        found = known[spec]
        return list(found(model) if callable(found) else found)
    names = [n for n in spec.split(",") if n] if isinstance(spec, str) else list(spec)
    if not names:
        raise LayerError(f"no layers in {spec!r}; presets for {cfg['model']}: {', '.join(known)}")
    try:
        named_modules_checked(model, names)
    except ValueError as e:
        presets_hint = f"; presets for {cfg['model']}: {', '.join(known)}" if known else ""
        raise LayerError(f"{e}{presets_hint}") from None
    return names


def compile_model(model: nn.Module, backend: str) -> nn.Module:
    """torch.compile for --compile. Dynamo by default assumes a module's hooks never change after
    compiling and shares compiled code between instances of one class, so a ResNet with SES hooks
    could run the graph compiled for a hook-less twin (no SES, silently). Guarding on the hooks
    (a process-wide dynamo setting, switched on only here) makes each hooked model its own graph."""
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    return torch.compile(model, backend=backend)
