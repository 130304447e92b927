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

BatchNorm: converted to SyncBatchNorm on CUDA before the SES hooks are attached (so a hook on a
BatchNorm module sits on the module that runs), so its statistics are those of the global batch
and a W-GPU run is the single-GPU algorithm the paper's numbers come from (per-GPU statistics over
B/W rows would change both the regularisation and the activations SES measures). The cost is one
all-reduce per BN layer in forward and backward, and torch.compile breaks its graph at each
SyncBatchNorm. torch has no SyncBatchNorm on the CPU, so gloo runs (the tests) keep per-process BN.

Randomness: the model is initialised from the run's seed on every rank (DDP also broadcasts rank 0's
weights), batch order and augmentation come from the loader's own (seed, epoch) generator, and
Mixup/CutMix draw from a generator of their own (batches.SeededMixer): all identical on every
rank. The global RNGs (CPU and CUDA), which dropout draws from, get one stream per rank
(seed_rank: rank 0 keeps the single-process stream), so the shards draw independent dropout masks,
as one process drawing for the whole batch would; every rank's RNG state is checkpointed.

Agreement: whatever all ranks must decide alike is decided once and shared. Rank 0 reads the run
folder (finished? claimed? settings? checkpoint readable?) and broadcasts; a stage without
collectives inside (data loading, building a run, evaluation, the final metrics) runs under
agree(), which shares every rank's outcome, so a failure on one rank fails that run on all of them
(AgreedError) and the sweep goes on with the next run. A non-finite loss is agreed inside the
training loop (an all-reduce). Any other failure inside a training epoch leaves the other ranks in
a collective: that rank ends the job (torchrun stops the others) and the same command resumes.
Collectives time out after SES_DIST_TIMEOUT_S seconds (default 7200), long enough for a first
download of the data by another process.

Rank 0 alone writes the run folders and prints the sweep's progress (the other ranks' stdout is
discarded; their errors still reach stderr, agreed ones are told once, by rank 0). Data is the
exception: whichever rank takes the data folder's lock first downloads, extracts and caches it
(plumbing.files.prepare_once). Every rank evaluates (the same numbers, in parallel, so no rank
waits at a collective for minutes). Checkpoints resume under torchrun or on one GPU alike.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from plumbing import gpu


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


def rank_device(device: str) -> str:
    """The device this process uses: under torchrun, a CUDA device becomes cuda:LOCAL_RANK (one GPU a
    rank); otherwise `device` as given."""
    if launched() and device.startswith("cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


def init(device: str) -> tuple[World, str]:
    """Join torchrun's process group (NCCL on GPUs, gloo on the CPU) on rank_device(device); returns the
    world and that device."""
    if not launched():
        return World(), device
    device = rank_device(device)
    cuda = device.startswith("cuda")
    if cuda:
        gpu.use(device)
    join("nccl" if cuda else "gloo")
    return current(), device


def join(backend: str, **kwargs) -> None:
    """init_process_group(backend, timeout=timeout(), **kwargs), so that finish() can tear it down.

    torch._dynamo is imported first: imported after the group exists (DistributedDataParallel's
    constructor imports it), it keeps references to the default group that destroy_process_group
    cannot drop (seen with torch 2.14: gloo's pt_gloo_runloop and gloo_tcp_loop threads keep running
    after destroy_process_group). The group then dies only during interpreter shutdown, with its
    threads still running, which is where gloo aborts a process ("terminate called without an
    active exception"). Imported before, destroy_process_group stops those threads (tested)."""
    import torch._dynamo  # noqa: F401 - see above
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout(), **kwargs)


def timeout() -> datetime.timedelta:
    """How long a collective waits for the slowest rank (SES_DIST_TIMEOUT_S, default 2 h)."""
    value = os.environ.get("SES_DIST_TIMEOUT_S", "7200")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"SES_DIST_TIMEOUT_S={value!r} is not a number of seconds > 0")
    return datetime.timedelta(seconds=seconds)


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


def seed_rank(seed: int) -> None:
    """Give this rank its own stream of the global RNGs (dropout); rank 0 keeps the single-process one."""
    if current().rank > 0:
        torch.manual_seed(seed * 1_000_003 + current().rank)  # also seeds every CUDA device


def uses_sync_batchnorm(device: torch.device) -> bool:
    return current().size > 1 and device.type == "cuda"


def sync_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model with SyncBatchNorm for every BatchNorm when several CUDA ranks run (call it before
    attaching hooks: the conversion replaces the BatchNorm modules), else the model itself."""
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) if uses_sync_batchnorm(device) else model


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel when several ranks run, else the model."""
    if current().size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


class AgreedError(RuntimeError):
    """A stage failed on another rank (of an exception class that cannot be rebuilt from its message)."""


def agree(fn, *args, **kwargs):
    """fn(*args, **kwargs) on every rank, then every rank's outcome shared. If it raised on any
    rank, every rank raises: the failing rank its own exception, the others the same exception
    class with that rank's message, each marked `agreed = True` (so each rank records the same
    failure and goes on to the next run together). In one process: just fn. Only for stages with
    no collective inside: a rank that fails must not leave the others waiting in one.
    KeyboardInterrupt and SystemExit are never caught."""
    if current().size == 1:
        return fn(*args, **kwargs)
    try:
        out, failure, error = fn(*args, **kwargs), None, None
    except Exception as e:  # noqa: BLE001 - shared below, raised on every rank
        out, error = None, e
        failure = (type(e), str(e).strip().splitlines()[0] if str(e).strip() else "")
    outcomes = gather_objects(failure)
    failed = [(rank, f) for rank, f in enumerate(outcomes) if f is not None]
    if not failed:
        return out
    if error is None:
        rank, (cls, msg) = failed[0]
        try:
            error = cls(f"{msg} (on rank {rank})")
        except Exception:  # noqa: BLE001 - a class that takes other arguments
            error = AgreedError(f"{cls.__name__}: {msg} (on rank {rank})")
    error.agreed = True
    raise error


def finish(clean: bool = True) -> None:
    """Leave the process group. After a clean end every rank first meets the others at a barrier,
    so no rank tears down its communicator while another still talks to it; after a failure (the
    others may be inside a collective, or gone) it leaves at once."""
    if dist.is_available() and dist.is_initialized():
        try:
            if clean:
                dist.barrier()
        finally:
            dist.destroy_process_group()
