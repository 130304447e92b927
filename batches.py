"""Batches of a dataset that lives on the device: the seeded loader, its batched augmentation, Mixup/CutMix.

GpuLoader(x, y, batch_size, device, train, augment, seed).epoch(e) yields (x, y) batches drawn on the
device by a permutation seeded by (seed, e): no host copy, no worker process, and a resumed run sees
the same batches. Augmentation (random_crop_flip) and mixing (make_mixer) act on the whole device batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Batched RandomCrop(size, padding=pad, zero fill) + RandomHorizontalFlip on (B, C, H, W)."""
    b, c, h, w = x.shape
    dev = x.device
    if pad:
        xp = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=g)
        dx = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=g)
        rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]
        x = xp[torch.arange(b, device=dev)[:, None, None, None],
               torch.arange(c, device=dev)[None, :, None, None], rows, cols]
    flip = torch.rand(b, device=dev, generator=g) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


class GpuLoader:
    """The whole dataset on `device`; batches drawn by a seeded per-epoch permutation.

    Yields (x, y): uint8 images come out as float32 in [0, 1], (B, C, H, W) channels_last
    (normalisation is the model's first op, so noise and FGSM act on real pixels); other dtypes
    pass through. `augment(x, generator)` runs on the device batch (before the float conversion
    for images). Training loaders shuffle and drop the last partial batch; batch order and
    augmentation depend only on (seed, epoch), so a resumed run sees the same batches.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, device, train: bool,
                 augment=None, seed: int = 0):
        self.x, self.y = x.to(device), y.to(device)
        self.batch_size, self.train, self.augment, self.seed = batch_size, train, augment, seed
        self.device = torch.device(device)

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def epoch(self, epoch: int = 0):
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed * 1_000_003 + epoch)
        n = len(self.y)
        order = torch.randperm(n, device=self.device, generator=g) if self.train else None
        for i in range(len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            idx = order[sl] if order is not None else sl
            xb, yb = self.x[idx], self.y[idx]
            if self.augment is not None:
                xb = self.augment(xb, g)
            yield to_input(xb), yb


def to_input(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 [0, 1] channels_last; anything else unchanged."""
    if x.dtype == torch.uint8:
        return x.float().div_(255).contiguous(memory_format=torch.channels_last)
    return x


class SeededMixer:
    """Mixup/CutMix drawing its lambda and box from a CPU generator of its own (seeded by the run's
    seed, checkpointed with state_dict), not from the global RNG: so under torchrun every rank mixes
    its global batch alike while dropout draws per-rank streams from the global RNGs."""

    def __init__(self, transform, seed: int):
        self.transform = transform
        self.state = torch.Generator().manual_seed(seed).get_state()

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        with torch.random.fork_rng(devices=[]):  # the global CPU RNG is untouched outside this block
            torch.set_rng_state(self.state)
            out = self.transform(x, y)
            self.state = torch.get_rng_state()
        return out

    def state_dict(self) -> dict:
        return {"rng": self.state}

    def load_state_dict(self, state: dict) -> None:
        self.state = state["rng"]


MIXES = ("none", "mixup", "cutmix")


def make_mixer(kind: str, num_classes: int, alpha: float = 1.0, seed: int = 0):
    """None, or a callable (x, y) -> (x_mixed, soft_targets (B, num_classes)) on the device batch.

    torchvision.transforms.v2.MixUp / CutMix, their lambda and box drawn from a generator seeded by
    `seed` (SeededMixer). Soft targets go straight into F.cross_entropy.
    """
    if kind in (None, "", "none"):
        return None
    from torchvision.transforms import v2
    if kind == "mixup":
        return SeededMixer(v2.MixUp(alpha=alpha, num_classes=num_classes), seed)
    if kind == "cutmix":
        return SeededMixer(v2.CutMix(alpha=alpha, num_classes=num_classes), seed)
    raise ValueError(f"unknown mix {kind!r}; use {', '.join(MIXES)}")
