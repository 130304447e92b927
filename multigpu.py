"""One run across GPUs with torchrun: the process group, each rank's shard of a global batch, the
differentiable gather of SES activations, and which rank writes.

    torchrun --standalone --nproc_per_node 2 exp11_resnet50_tinyimagenet.py       # 2 GPUs, one run at a time

Every rank holds the whole dataset on its device and draws the same global batch (order and
augmentation are seeded by (seed, epoch); Mixup's λ comes from the global RNG, seeded alike), then
trains on its contiguous shard of B / W rows. DistributedDataParallel averages the gradients.

SES sees the global batch: each hooked activation (B/W, d) is all-gathered into (B, d) with
an all_gather whose backward sums the gradients of every rank's copy of R back onto each shard
(an all_reduce of the (B, d) gradient, then this rank's rows). Every rank computes the same R, so its shard receives W·∂R/∂a_r, and DDP's
average over W ranks leaves exactly ∂R/∂θ: the penalty and its gradient equal the single-process
ones at the same global batch (tested with gloo). The CE of each shard is its own mean; DDP's
average of those is the global mean (equal shards: B must divide by W).

BatchNorm: converted to SyncBatchNorm on CUDA, so its statistics are those of the global batch
and a W-GPU run is the single-GPU algorithm the paper's numbers come from (per-GPU statistics over
B/W rows would change both the regularisation and the activations SES measures). The cost is one
all-reduce per BN layer in forward and backward. torch has no SyncBatchNorm on the CPU, so gloo
runs (the tests) keep per-process BN. Dropout masks repeat across ranks (all RNGs are seeded
alike so that augmentation and Mixup agree); the ResNets have no dropout. SES's "auto" solver
route is agreed: each rank times the routes, and all take the one fastest on the slowest rank.

Only rank 0 writes files and prints; every rank evaluates (the same numbers, in parallel, so no
rank waits at a collective for minutes). A failure on any rank ends the job (torchrun stops the
others); rerunning the command resumes from the last checkpoint, which also resumes on one GPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str) -> tuple[World, str]:
    """Join torchrun's process group (NCCL on GPUs, gloo on the CPU); the device this rank uses."""
    if not launched():
        return World(), device
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return current(), device


def current() -> World:
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def shard(world: World, batch: int) -> slice:
    """This rank's rows of a global batch of `batch` rows (checked divisible when the run is built)."""
    n = batch // world.size
    return slice(world.rank * n, (world.rank + 1) * n)


class _GatherRows(torch.autograd.Function):
    """all_gather forward; backward sums every rank's gradient of the gathered rows (all_reduce)
    and keeps this rank's slice: a reduce-scatter that gloo and NCCL both run."""

    @staticmethod
    def forward(ctx, a: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(a) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, a)
        ctx.rows = slice(dist.get_rank() * a.shape[0], (dist.get_rank() + 1) * a.shape[0])
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
        dist.all_reduce(grad)
        return grad[ctx.rows]


def gather_rows(a: torch.Tensor) -> torch.Tensor:
    """(n_local, d) on every rank -> (n_local * W, d) in rank order; differentiable (see above)."""
    return _GatherRows.apply(a.contiguous())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if current().size > 1:
        dist.all_reduce(t)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if current().size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast(value):
    """Rank 0's value on every rank (any picklable object)."""
    if current().size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value) -> list:
    """[value of rank 0, value of rank 1, ...] on every rank ([value] in one process)."""
    if current().size == 1:
        return [value]
    out = [None] * current().size
    dist.all_gather_object(out, value)
    return out


def barrier() -> None:
    if current().size > 1:
        dist.barrier()


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel (with SyncBatchNorm on CUDA) when several ranks run, else the model."""
    if current().size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[device.index])
    return DistributedDataParallel(model)


def finish() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
