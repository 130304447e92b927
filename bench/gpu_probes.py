"""The probes of bench/gpu_check.sh, one per subcommand, each run as its own process (a crash or a
sticky CUDA error ends that probe only). Each prints its figures as one last line
`GPU_CHECK_RESULT <json>` and exits 0, or prints what failed as one line and exits 1.

    python bench/gpu_probes.py env                    versions, devices, which libcusolver and entry points
    python bench/gpu_probes.py selftest [--device D]  cusolver_batched.selftest at the real stack shapes
    python bench/gpu_probes.py hostsync [--device D]  per route: does forward + backward return while the GPU is busy?
    torchrun --standalone --nproc_per_node 1 bench/gpu_probes.py collectives [--device D]
                                                      all_gather / all_reduce / all_gather_object over NCCL (gloo on a CPU)

Real shapes (B, k) of the padded stack the batched routes solve at batch 256: ResNet-18 `all` (8, 256)
(sizes 64, 64, 128, 128, 256 x 4, avgpool = layer4.1 solved once), ResNet-50 `layer4+avgpool` (3, 256);
under torchrun with a gathered batch of 512: (8, 512) and (3, 512).
hostsync: a torch.cuda._sleep of SLEEP_S seconds is queued first, then one forward + backward of the
route on the ResNet-18 matrices; return_s is the host time until the call returns, done_s until the
GPU is done. A route whose call makes the host wait for the GPU (a host read of a device value, a copy
to the CPU) returns only after the sleep (return_s ~ done_s >= SLEEP_S): host_waits_for_gpu.
env also records the commit of the code and the date, as bench_ses.py's JSON does.
"""
import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

import records  # bench/records.py, beside this file
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ses_solvers import cusolver_batched  # noqa: E402
from ses_core import _centred_gram, entropy_of_spectrum  # noqa: E402
from ses_solvers.routes import SOLVERS, forward_backward, padded_shape, unavailable  # noqa: E402

RESULT = "GPU_CHECK_RESULT "
SHAPES = [(8, 256), (3, 256), (8, 512), (3, 512)]
R18_DIMS = [64, 64, 128, 128, 256, 256, 512, 512]  # ResNet-18 `all`'s 8 blocks at n = 256 (avgpool = layer4.1)
SLEEP_S = 0.5


def env(args) -> dict:
    out = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
               cudnn=torch.backends.cudnn.version(), cuda_available=torch.cuda.is_available(),
               torch_batches_eigh=cusolver_batched.torch_batches_eigh(), host=platform.node(),
               date=records.utc_now(), commit=records.commit())
    try:  # the installed version, not imported here (2-3 s); the bench and script parts import it
        out["torchvision"] = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        out["torchvision"] = "missing"
    if torch.cuda.is_available():
        out["devices"] = [dict(name=torch.cuda.get_device_name(i), capability=list(torch.cuda.get_device_capability(i)),
                               memory_gib=round(torch.cuda.get_device_properties(i).total_memory / 2 ** 30, 1))
                          for i in range(torch.cuda.device_count())]
    try:
        out["libcusolver"] = cusolver_batched.find_library(torch.device("cuda", 0) if torch.cuda.is_available() else None)
        out["batched_entry_point"] = "XsyevBatched" if cusolver_batched.has_xsyev_batched() else "syevjBatched"
    except (OSError, RuntimeError) as e:
        out["libcusolver"] = f"{type(e).__name__}: {e}"
    return out


def selftest(args) -> dict:
    t0 = time.perf_counter()
    cases = cusolver_batched.selftest(args.device, SHAPES)
    worst = {dt: max(c["eigenvalue_error"] for c in cases if c["dtype"] == dt) for dt in ("float32", "float64")}
    return dict(device=args.device, shapes=SHAPES, cases=cases, max_eigenvalue_error=worst,
                entry_point="XsyevBatched" if cusolver_batched.has_xsyev_batched() else "syevjBatched",
                host_workspace_bytes=max((c["host_workspace_bytes"] or 0) for c in cases),
                seconds=time.perf_counter() - t0)


def _sleep_cycles(seconds: float) -> int:
    """GPU clock cycles that torch.cuda._sleep spends in `seconds`, measured with two events."""
    torch.cuda._sleep(1000)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(20_000_000)
    end.record()
    end.synchronize()
    return int(20_000_000 / (start.elapsed_time(end) / 1e3) * seconds)


def hostsync(args) -> dict:
    dev = torch.device(args.device)
    torch.cuda.set_device(dev)
    g = torch.Generator().manual_seed(0)
    grams = [_centred_gram(torch.randn(256, d, generator=g).to(dev)) for d in R18_DIMS]
    cycles = _sleep_cycles(SLEEP_S)
    routes = {}
    for route in SOLVERS[1:]:
        why = unavailable(route, dev, padded_shape(grams))
        if why:
            routes[route] = dict(skipped=why)
            continue
        forward_backward(grams, route, entropy_of_spectrum)  # warm-up: handles, workspaces, the host thread pool
        torch.cuda.synchronize(dev)
        torch.cuda._sleep(cycles)
        t0 = time.perf_counter()
        forward_backward(grams, route, entropy_of_spectrum)
        returned = time.perf_counter() - t0
        torch.cuda.synchronize(dev)
        done = time.perf_counter() - t0
        routes[route] = dict(return_s=returned, done_s=done, host_waits_for_gpu=returned >= SLEEP_S / 2)
        if route.startswith("batched"):
            routes[route]["host_workspace_bytes"] = cusolver_batched.host_workspace_bytes(dev)
    return dict(device=args.device, sleep_s=SLEEP_S, sizes=[min(256, d) for d in R18_DIMS], routes=routes)


def collectives(args) -> dict:
    import torch.distributed as dist
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=60))
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        t = torch.arange(4.0, device=dev) + rank
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t)
        total = t.clone()
        dist.all_reduce(total)
        objs = [None] * world
        dist.all_gather_object(objs, {"rank": rank})
        dist.barrier()
        expected = torch.arange(4.0) + torch.arange(world, dtype=torch.float32)[:, None]
        return dict(backend=dist.get_backend(), world_size=world, all_gather=torch.equal(torch.stack(parts).cpu(), expected),
                    all_reduce=torch.equal(total.cpu(), expected.sum(0)), all_gather_object=objs,
                    note="WORLD_SIZE=1: the experiment scripts take their one-process path here (multigpu.launched() "
                         "is False), so this probe is what forms a process group")
    finally:
        dist.destroy_process_group()


PROBES = dict(env=env, selftest=selftest, hostsync=hostsync, collectives=collectives)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("probe", choices=list(PROBES))
    p.add_argument("--device", default="cuda:0", help="device to probe (default cuda:0)")
    args = p.parse_args(argv)
    try:
        figures, code = PROBES[args.probe](args), 0
    except Exception as e:  # noqa: BLE001 - a probe reports any failure as one line; the check goes on
        figures, code = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}, 1
        print(figures["error"], file=sys.stderr)
    print(RESULT + json.dumps(figures), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
