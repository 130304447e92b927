"""Perceiver (Jaegle et al., 2021) for classification, with taps for SES on the latent array.

Shapes: the input becomes a byte array of N tokens, (B, N, C_in) = raw values (+ position
encoding); a latent array (M, D), normal sigma 0.02 truncated at +-2 sigma, cross-attends to it (queries from
the latents, keys/values from the inputs; 1 head), then a latent transformer of
`num_transformer_blocks` self-attention blocks (`num_heads` heads) refines (B, M, D); this
(cross-attend, latent transformer) pair repeats `num_cross_attend_stages` times. Weight sharing
(`weight_sharing`): "paper" (default; Jaegle et al. 2021, sec. 2: the first cross-attend has its own
weights, later cross-attends share one set, and ONE latent transformer is shared by every repeat,
which is what the paper's 44.9M-parameter ImageNet count implies); "port" (a popular PyTorch port:
the first latent transformer unshared too); "none" (every repeat its own weights). Pre-norm
residual blocks, GELU MLPs, dropout. Output: mean over latents or a learned CLS latent -> LayerNorm
-> Linear. After every latent block the (B, M, D) latents pass through an nn.Identity tap
(`taps.<i>`), so SES hooks distinct modules even when the blocks are shared (pooled over latents).

Position encodings: Fourier features of coordinates x in [-1, 1] per axis, `num_bands` frequencies
f_k linearly spaced from 1 to max_freq / 2, features [x, sin(pi f_k x), cos(pi f_k x)] per axis
(no random projection); or learned encodings (N, pe_dim), truncated normal 0.02.
Images (B, 3, H, W) in [0, 1] -> H*W pixel tokens (normalised values + PE); an optional fixed
pixel permutation (seeded) reorders the pixel values over the fixed positions, identically for
training and test. permute_order "after_pe" (the paper's permuted-ImageNet setting, default): each
pixel moves together with its position features, so the token set is only reordered and a
Fourier-feature Perceiver (attention is permutation invariant over its inputs) computes exactly
the same function; "before_pe": the pixel values move over fixed positions, which destroys the
spatial structure the Fourier features describe. With learned encodings the two orders are
statistically the same (a fixed relabelling of learned parameters). Point clouds (B, P, 3) -> P tokens (xyz + Fourier features of xyz).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from batches import GpuLoader
from plumbing.files import atomic_torch_save

WEIGHT_SHARING = ("paper", "port", "none")  # what the repeats of cross-attend and latent transformer share
POOLINGS = ("mean", "cls")                  # the output: mean over latents, or a learned CLS latent
PERMUTE_ORDERS = ("after_pe", "before_pe")  # a pixel permutation moves pixels with their positions, or over them


def fourier_features(coords: torch.Tensor, num_bands: int, max_freq: float) -> torch.Tensor:
    """(..., A) coordinates in [-1, 1] -> (..., A * (2 * num_bands + 1)): [x, sin(pi f x), cos(pi f x)]."""
    freqs = torch.linspace(1.0, max_freq / 2, num_bands, device=coords.device, dtype=torch.float32)
    x = coords.float().unsqueeze(-1)                       # (..., A, 1)
    scaled = math.pi * x * freqs                           # (..., A, K)
    feats = torch.cat([x, scaled.sin(), scaled.cos()], -1)  # (..., A, 2K + 1)
    return feats.flatten(-2)


def grid_coords(h: int, w: int) -> torch.Tensor:
    """(h * w, 2) pixel-centre coordinates in [-1, 1], row-major."""
    ys, xs = torch.linspace(-1, 1, h), torch.linspace(-1, 1, w)
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)


def attention(q, k, v, mask=None, dropout=0.0, need_weights=False):
    """Multi-head attention on (B, heads, L, d) tensors; mask (B, S) True = valid key.

    Uses scaled_dot_product_attention; with need_weights the softmax weights (B, heads, L, S)
    are computed explicitly and returned too (for the saved attention maps).
    """
    attn_mask = None if mask is None else mask[:, None, None, :]
    if not need_weights:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout), None
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    weights = scores.float().softmax(-1).to(q.dtype)
    return F.dropout(weights, dropout, training=dropout > 0) @ v, weights


class MLP(nn.Sequential):
    def __init__(self, dim: int, ratio: int, dropout: float):
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, ratio * dim), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(ratio * dim, dim), nn.Dropout(dropout))


class CrossAttention(nn.Module):
    """latents (B, M, D) attend to inputs (B, N, C): pre-norm, 1 head, residual, then MLP."""

    def __init__(self, dim: int, in_dim: int, dropout: float, mlp_ratio: int = 4):
        super().__init__()
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(in_dim)
        self.q, self.kv, self.out = nn.Linear(dim, dim), nn.Linear(in_dim, 2 * dim), nn.Linear(dim, dim)
        self.dropout, self.mlp = dropout, MLP(dim, mlp_ratio, dropout)

    def forward(self, latents, inputs, mask=None, need_weights=False):
        q = self.q(self.norm_q(latents))[:, None]                    # (B, 1, M, D)
        k, v = self.kv(self.norm_kv(inputs))[:, None].chunk(2, -1)    # (B, 1, N, D) each
        o, w = attention(q, k, v, mask, self.dropout if self.training else 0.0, need_weights)
        latents = latents + F.dropout(self.out(o[:, 0]), self.dropout, self.training)
        return latents + self.mlp(latents), (None if w is None else w[:, 0])  # weights (B, M, N)


class SelfAttentionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float, mlp_ratio: int = 4):
        super().__init__()
        if dim % heads:
            raise ValueError(f"latent_dim {dim} is not divisible by num_heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.norm, self.qkv, self.out = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = MLP(dim, mlp_ratio, dropout)

    def forward(self, x):
        b, m, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, m, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o, _ = attention(q, k, v, dropout=self.dropout if self.training else 0.0)
        x = x + F.dropout(self.out(o.transpose(1, 2).reshape(b, m, d)), self.dropout, self.training)
        return x + self.mlp(x)


class Perceiver(nn.Module):
    def __init__(self, num_classes: int, input_kind: str, num_tokens: int, image_size: int | None = None,
                 mean=None, std=None, num_latents: int = 96, latent_dim: int = 384, num_cross_attend_stages: int = 4,
                 num_transformer_blocks: int = 4, num_heads: int = 3, dropout: float = 0.2,
                 num_bands: int = 64, max_freq: float = 32.0, use_learned_pe: bool = False, pe_dim: int = 256,
                 weight_sharing: str = "paper", pooling: str = "mean", permute_pixels: bool = False,
                 permute_seed: int = 42, permute_order: str = "after_pe"):
        super().__init__()
        if input_kind not in ("image", "points") or pooling not in POOLINGS:
            raise ValueError(f"input_kind must be image or points, pooling mean or cls; got {input_kind}, {pooling}")
        if input_kind == "points" and (use_learned_pe or permute_pixels):
            raise ValueError("point clouds use Fourier features of their coordinates: no learned PE or pixel permutation")
        if isinstance(weight_sharing, bool):  # older configs: True meant the port's convention
            weight_sharing = "port" if weight_sharing else "none"
        if weight_sharing not in WEIGHT_SHARING or permute_order not in PERMUTE_ORDERS:
            raise ValueError(f"weight_sharing must be paper, port or none and permute_order after_pe or before_pe; "
                             f"got {weight_sharing}, {permute_order}")
        self.input_kind, self.num_bands, self.max_freq, self.pooling = input_kind, num_bands, max_freq, pooling
        self.permute_order = permute_order
        axes = 2 if input_kind == "image" else 3
        pe = pe_dim if use_learned_pe else axes * (2 * num_bands + 1)
        in_dim = 3 + pe
        if input_kind == "image":
            self.register_buffer("mean", torch.tensor(mean).view(1, 1, 3))
            self.register_buffer("std", torch.tensor(std).view(1, 1, 3))
            if use_learned_pe:
                self.learned_pe = nn.Parameter(nn.init.trunc_normal_(torch.empty(num_tokens, pe_dim), std=0.02, a=-0.04, b=0.04))
            else:
                self.register_buffer("fixed_pe", fourier_features(grid_coords(image_size, image_size), num_bands, max_freq))
            g = torch.Generator().manual_seed(permute_seed)
            perm = torch.randperm(num_tokens, generator=g) if permute_pixels else torch.arange(num_tokens)
            self.register_buffer("pixel_perm", perm)
        extra = 1 if pooling == "cls" else 0
        self.latents = nn.Parameter(nn.init.trunc_normal_(torch.empty(num_latents + extra, latent_dim), std=0.02, a=-0.04, b=0.04))

        def cross():
            return CrossAttention(latent_dim, in_dim, dropout)

        def latent_transformer():
            return nn.Sequential(*[SelfAttentionBlock(latent_dim, num_heads, dropout) for _ in range(num_transformer_blocks)])
        repeats = num_cross_attend_stages
        if weight_sharing in ("paper", "port"):
            shared = (cross(), latent_transformer()) if repeats > 1 else (None, None)
            self.cross = nn.ModuleList([cross()] + [shared[0]] * (repeats - 1))
            if weight_sharing == "paper":
                transformer = latent_transformer()
                self.transformers = nn.ModuleList([transformer] * repeats)
            else:
                self.transformers = nn.ModuleList([latent_transformer()] + [shared[1]] * (repeats - 1))
        else:
            self.cross = nn.ModuleList([cross() for _ in range(repeats)])
            self.transformers = nn.ModuleList([latent_transformer() for _ in range(repeats)])
        self.taps = nn.ModuleList([nn.Identity() for _ in range(repeats * num_transformer_blocks)])
        self.head = nn.Sequential(nn.LayerNorm(latent_dim), nn.Linear(latent_dim, num_classes))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Input -> byte array (B, N, C_in): values + position encoding."""
        if self.input_kind == "points":  # (B, P, 3) xyz in the unit sphere
            return torch.cat([x.float(), fourier_features(x, self.num_bands, self.max_freq)], -1)
        b = x.shape[0]
        pix = (x.flatten(2).transpose(1, 2) - self.mean) / self.std  # (B, H*W, 3), row-major
        pe = (self.learned_pe if hasattr(self, "learned_pe") else self.fixed_pe).to(pix.dtype).expand(b, -1, -1)
        if self.permute_order == "before_pe":  # permuted values over fixed positions
            return torch.cat([pix[:, self.pixel_perm], pe], -1)
        return torch.cat([pix, pe], -1)[:, self.pixel_perm]  # each pixel keeps its position features

    def forward(self, x, mask=None, return_attention=False):
        inputs = self.tokens(x)
        z = self.latents.expand(inputs.shape[0], -1, -1)
        maps, tap = [], 0
        for cross, transformer in zip(self.cross, self.transformers):
            z, w = cross(z, inputs, mask, need_weights=return_attention)
            maps.append(w)
            for block in transformer:
                z = self.taps[tap](block(z))
                tap += 1
        pooled = z[:, -1] if self.pooling == "cls" else z.mean(1)
        logits = self.head(pooled)
        return (logits, torch.stack(maps, 1)) if return_attention else logits  # maps (B, stages, M, N)

    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Cross-attention weights (B, stages, M, N) of `x` (eval mode, no grad), for the saved maps."""
        self.eval()
        with torch.no_grad():
            return self(x, return_attention=True)[1]


def latent_taps(model: Perceiver) -> list[str]:
    """The SES hook preset `latents`: every latent block's output."""
    return [f"taps.{i}" for i in range(len(model.taps))]


def build_perceiver(cfg: dict, info: dict) -> Perceiver:
    """The harness's model builder: settings from the resolved config, sizes from the dataset."""
    kind = "points" if info.get("kind") == "points" else "image"
    num_tokens = info["num_points"] if kind == "points" else info["image_size"] ** 2
    return Perceiver(
        num_classes=info["num_classes"], input_kind=kind, num_tokens=num_tokens, image_size=info.get("image_size"),
        mean=info.get("mean"), std=info.get("std"), num_latents=cfg["num_latents"], latent_dim=cfg["latent_dim"],
        num_cross_attend_stages=cfg["num_cross_attend_stages"], num_transformer_blocks=cfg["num_transformer_blocks"],
        num_heads=cfg["num_heads"], dropout=cfg["dropout"], num_bands=cfg["num_bands"], max_freq=cfg["max_freq"],
        use_learned_pe=cfg["use_learned_pe"], weight_sharing=cfg["weight_sharing"], pooling=cfg["pooling"],
        permute_pixels=cfg["permute_pixels"], permute_seed=cfg["permute_seed"],
        permute_order=cfg["permute_order"])


def save_attention_maps(model, data, run_dir: Path, epoch: int, cfg: dict, n_samples: int = 4) -> None:
    """Epoch callback: every cfg['attention_every'] epochs (and at the last), the cross-attention maps
    of the first n test samples -> run_dir/attention/epoch_XXX.pt (maps in fp16, inputs as stored)."""
    every = cfg["attention_every"]
    if not every or not isinstance(model, Perceiver) or (epoch % every and epoch != cfg["epochs"]):
        return
    x, y = data.test_x[:n_samples], data.test_y[:n_samples]
    xb = next(GpuLoader(x, y, n_samples, x.device, train=False).epoch())[0]
    maps = model.attention_maps(xb)
    atomic_torch_save(dict(epoch=epoch, inputs=x.cpu(), labels=y.cpu(), maps=maps.half().cpu(),
                           pixel_perm=getattr(model, "pixel_perm", None)),
                      Path(run_dir) / "attention" / f"epoch_{epoch:03d}.pt")
