"""Benchmark SES on the device it is given: solver routes, and training steps against the baseline.

    python bench/bench_ses.py                          # CUDA if available; bf16 (or fp16 below sm_80)
    python bench/bench_ses.py --amp bf16 fp16 --json out.json
    python bench/bench_ses.py --device cpu --steps 2 --setups resnet18   # a CPU run: see the note it prints

1. Solver (for the --setups asked for): ms per SES step's eigen-solve (forward + backward) for each
   exact route of ses_solvers (float32 / float64 eigvalsh per size, float64 eigh on the host, padded
   float64 eigvalsh in one call, the direct batched cuSOLVER call in float32 / float64), compared as
   --preflight compares them (routes.compare_routes): each route's H checked against float64 LAPACK (a
   route that is off, fails or cannot run on this device is listed with why), then --repeats
   back-to-back reps between two CUDA events, no sync inside, the median of 3 interleaved rounds. On the matrices SES really solves at batch n = 256: ResNet-18 `all`
   8 matrices of sizes 64, 64, 128, 128, 256, 256, 256, 256 (9 hooks; avgpool = layer4.1, solved once)
   and ResNet-50 `layer4+avgpool` 3 of size 256 (4 hooks; avgpool = layer4.2). What torch's eigvalsh
   does there depends on its version (torch >= 2.12: one cusolverDnXsyevBatched call per batched input;
   <= 2.11: a loop of single-matrix calls for sizes 33-512); env.torch_batches_eigh says which.
2. Steps, per setup and per --amp: the CIFAR-stem ResNet-18 on CIFAR-100 shapes and ResNet-50 on
   Tiny-ImageNet shapes at batch 256, baseline and SES k in --ks (default 1, 3, 5, 10) on --ses-solver
   (default float32, the route a sweep takes on a GPU without a --preflight record; each row names its
   route), and SES k = 1 with each exact route fixed ("k=1 <route>": the step as training runs it, host
   syncs included, which the timing of the solve alone cannot see); with --compile also torch.compile'd baseline and the
   smallest and largest k (default 1 and 10; --compiled-only: those alone, no solver table). Timed interleaved in one process
   (round-robin over the variants, one group of steps each, median over rounds) on one constant
   on-device batch, plus the baseline fed by the suite's GPU loader (random crop + flip) over 50k
   generated images. A variant's group is --group rounded up to a multiple of its k (k = 3: 12 steps),
   so every timed group holds exactly group / k SES steps and its mean step time is the real
   schedule's; each row records its group, the SES steps counted in each group and the matrices solved
   per SES step (under torch.compile ResNet-18 `all` solves 9: the avgpool alias is not seen there).
   Prints a table and writes --json atomically, with the commit and date (bench/cost_table.py turns
   such files into the SES-cost table).
3. --profile: a torch.profiler table of 5 SES k = 1 steps per setup (2 on a CPU): where the SES time goes.
"""
import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import records  # noqa: E402  (bench/records.py, beside this file)
from ses_solvers import cusolver_batched  # noqa: E402
from harness.config import DEFAULTS  # noqa: E402
from harness.settings import SETTINGS  # noqa: E402
from batches import GpuLoader, random_crop_flip  # noqa: E402
from data_utils import DATASETS, synthetic_dataset  # noqa: E402
from plumbing.files import write_json  # noqa: E402
from harness.models import build_resnet, compile_model, resolve_layers  # noqa: E402
from ses_core import SES, _centred_gram, entropy_of_spectrum  # noqa: E402
from ses_solvers.routes import ROUTES, compare_routes, unavailable  # noqa: E402
from harness.training import AMP_MODES, amp_policy  # noqa: E402

SETUPS = {"resnet18": dict(model="resnet18", layers="all", dataset="cifar100", size=32, label="resnet18 all",
                           dims=[64, 64, 128, 128, 256, 256, 512, 512]),        # avgpool = layer4.1: solved once
          "resnet50": dict(model="resnet50", layers="layer4+avgpool", dataset="tinyimagenet", size=64,
                           label="resnet50 layer4+avgpool", dims=[2048, 2048, 2048])}  # avgpool = layer4.2


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_solvers(device, n, repeats, setups):
    """ms per forward + backward of every exact route (compare_routes: checked against float64 LAPACK,
    `repeats` back-to-back reps between two events, median of its rounds) on the matrices SES solves for
    each setup, at batch n."""
    rows = []
    for name in setups:
        label, dims = SETUPS[name]["label"], SETUPS[name]["dims"]
        g = torch.Generator().manual_seed(0)
        grams = [_centred_gram(torch.randn(n, d, generator=g).to(device)) for d in dims]
        sizes = [gm.shape[-1] for gm in grams]
        timings, rejected = compare_routes(grams, entropy_of_spectrum, ROUTES, repeats)
        for solver in ROUTES:
            if solver in rejected:
                rows.append(dict(layers=label, solver=solver, sizes=sizes, ms=None, skipped=rejected[solver]))
                print(f"solver  {label:<26} {solver:<9} skipped: {rejected[solver]}")
                continue
            rows.append(dict(layers=label, solver=solver, sizes=sizes, ms=1e3 * timings[solver], reps=repeats))
            print(f"solver  {label:<26} {solver:<9} {rows[-1]['ms']:8.2f} ms  (sizes {sizes})")
    return rows


def make_variant(setup, k, device, amp, compile_backend=None, solver="float32"):
    torch.manual_seed(0)
    cfg = dict(DEFAULTS, model=setup["model"], layers=setup["layers"])
    model = build_resnet(cfg, DATASETS[setup["dataset"]]).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    ses = SES(model, resolve_layers(cfg, model), solver=solver, **SETTINGS.arguments("SES", dict(cfg, every=k))) \
        if k else None
    if compile_backend:  # hooks stay on the plain modules; the compiled forward runs them without a graph break
        model = compile_model(model, compile_backend)
    return dict(model=model, opt=opt, ses=ses, scaler=amp.scaler(), k=k, matrices=None)


def step(v, x, y, amp):
    ses = v["ses"]
    if ses:
        ses.begin_step()
    with amp.autocast():
        loss = F.cross_entropy(v["model"](x), y)
    if ses and ses.collector.enabled:  # what spectral_entropies will solve: one matrix per distinct tensor
        v["matrices"] = len({id(a) for a in ses.collector.activations.values()})
    loss = loss + (ses.penalty() if ses else 0.0)
    v["opt"].zero_grad(set_to_none=True)
    v["scaler"].scale(loss).backward()
    v["scaler"].step(v["opt"])
    v["scaler"].update()


def variants_for(name, device, amp, batch, ks, compile_backend, compiled_only, solver="float32"):
    """{label: variant} in timing order, and {label: why} for the k=1 <route> variants this device cannot run."""
    setup, variants, skipped = SETUPS[name], {}, {}
    if not compiled_only:
        variants.update({f"k={k}" if k else "baseline": make_variant(setup, k, device, amp, solver=solver)
                         for k in (0, *ks)})
        shape = (len(setup["dims"]), min(batch, max(setup["dims"])))  # the padded stack of the real step
        for route in ROUTES:
            why = unavailable(route, device, shape)
            if why:
                skipped[f"k=1 {route}"] = why
            else:
                variants[f"k=1 {route}"] = make_variant(setup, 1, device, amp, solver=route)
    if compile_backend:  # compiled twins, interleaved with the rest (round 0 also pays the compilation)
        variants.update({(f"k={k}" if k else "baseline") + " compiled": make_variant(setup, k, device, amp, compile_backend,
                                                                                      solver)
                         for k in sorted({0, min(ks), max(ks)})})
    return variants, skipped


def bench_steps(name, device, amp, rounds, batch, data, compile_backend=None, group=10, ks=(1, 3, 5, 10),
                compiled_only=False, solver="float32"):
    """Rows of one setup in one precision; `data` = (images, labels) for the loader-fed baseline."""
    setup = SETUPS[name]
    info = DATASETS[setup["dataset"]]
    x = torch.rand(batch, 3, setup["size"], setup["size"], device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, info["num_classes"], (batch,), device=device)
    variants, skipped = variants_for(name, device, amp, batch, ks, compile_backend, compiled_only, solver)
    base_label = "baseline compiled" if compiled_only else "baseline"
    loader = GpuLoader(*data, batch, device, train=True, augment=lambda xb, gen: random_crop_flip(xb, gen, 4))
    batches = loader.epoch(0)
    timed = list(variants.items()) + ([] if compiled_only else [("baseline+loader", variants["baseline"])])
    sizes = {label: (v["k"] or 1) * math.ceil(group / (v["k"] or 1)) for label, v in timed}  # whole periods
    times = {label: [] for label, _ in timed}
    ses_steps = {label: [] for label, _ in timed}
    for rnd in range(rounds + 1):
        for label, v in timed:
            applied = v["ses"].applied_steps if v["ses"] else 0
            sync(device)
            t0 = time.perf_counter()
            for _ in range(sizes[label]):
                if label == "baseline+loader":
                    try:
                        xb, yb = next(batches)
                    except StopIteration:
                        batches = loader.epoch(rnd + 1)
                        xb, yb = next(batches)
                    step(v, xb, yb, amp)
                else:
                    step(v, x, y, amp)
            sync(device)
            if rnd:  # round 0 warms up (cuDNN autotuning, compilation)
                times[label].append((time.perf_counter() - t0) / sizes[label])
                ses_steps[label].append((v["ses"].applied_steps if v["ses"] else 0) - applied)
    base = statistics.median(times[base_label])
    rows = []
    for label, ts in times.items():
        ms = 1e3 * statistics.median(ts)
        v = variants.get(label)
        ses = v["ses"] if v else None
        solver = ses.solver if ses else "-"
        rows.append(dict(setup=name, amp=amp.name, variant=label, ms=ms, images_per_s=batch / (ms / 1e3),
                         vs_baseline=ms / (1e3 * base) - 1, solver=solver, steps_per_group=sizes[label],
                         ses_steps_per_group=ses_steps[label], matrices_per_ses_step=v["matrices"] if v else None))
        print(f"step    {name:<9} {amp.name} batch {batch} {label:<18} {ms:8.2f} ms {batch / (ms / 1e3):9.0f} img/s "
              f"{100 * rows[-1]['vs_baseline']:+7.1f} %  solver {solver}")
    for label, why in skipped.items():
        rows.append(dict(setup=name, amp=amp.name, variant=label, ms=None, vs_baseline=None, solver=label.split()[1],
                         skipped=why))
        print(f"step    {name:<9} {amp.name} batch {batch} {label:<18} skipped: {why}")
    for v in variants.values():
        if v["ses"]:
            v["ses"].remove()
    return rows


def profile_step(name, device, amp, batch, rows=15):
    """torch.profiler over 5 SES k=1 steps after 3 warm-up steps (on a CPU 2 after 1: nothing to autotune
    there): where an SES step's time goes (the eigensolver, the Gram matmuls, the host syncs, the
    convolutions), as a table."""
    from torch.profiler import ProfilerActivity, profile
    setup = SETUPS[name]
    v = make_variant(setup, 1, device, amp)
    x = torch.rand(batch, 3, setup["size"], setup["size"], device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, DATASETS[setup["dataset"]]["num_classes"], (batch,), device=device)
    warmup, steps = (3, 5) if device.type == "cuda" else (1, 2)
    for _ in range(warmup):
        step(v, x, y, amp)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step(v, x, y, amp)
        sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=rows)
    print(f"profile {name} {amp.name} batch {batch}, SES k=1, {steps} steps (sorted by {sort}):\n{table}")
    v["ses"].remove()

    def device_us(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
    key = device_us if device.type == "cuda" else (lambda e: e.self_cpu_time_total)
    top = sorted(prof.key_averages(), key=key, reverse=True)[:rows]
    return [dict(op=e.key, calls=e.count, self_cpu_ms=e.self_cpu_time_total / 1e3, self_device_ms=device_us(e) / 1e3)
            for e in top]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device to measure on: cuda, cuda:1 or cpu (default: cuda if available)")
    p.add_argument("--amp", nargs="+", choices=AMP_MODES, default=["auto"], help="precision path(s) (default auto)")
    p.add_argument("--steps", type=int, default=5, help="timed rounds of one group per variant (default 5)")
    p.add_argument("--group", type=int, default=10,
                   help="steps per variant per round, rounded up to a multiple of its k (default 10)")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 3, 5, 10], help="SES periods k to time (default 1 3 5 10)")
    p.add_argument("--repeats", type=int, default=5,
                   help="back-to-back reps per solver route between the two events (default 5)")
    p.add_argument("--batch", type=int, help="training batch (default 256; 16 on a CPU)")
    p.add_argument("--setups", nargs="+", choices=list(SETUPS), default=list(SETUPS), help="models to time")
    p.add_argument("--ses-solver", choices=ROUTES, default="float32",
                   help="the route of the baseline-to-k rows (default float32; the k=1 <route> rows time every route)")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    p.add_argument("--profile", action="store_true",
                   help="also print a torch.profiler breakdown of 5 SES k=1 steps per setup")
    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="also time torch.compile'd baseline, smallest and largest k (backend default inductor)")
    p.add_argument("--compiled-only", action="store_true",
                   help="with --compile: time only the compiled variants (no eager ones, no solver table)")
    args = p.parse_args(argv)
    if min(args.steps, args.repeats, args.group, *args.ks) < 1:
        p.exit(2, "bench_ses.py: error: --steps, --group, --repeats and --ks must be >= 1\n")
    if args.compiled_only and not args.compile:
        p.exit(2, "bench_ses.py: error: --compiled-only needs --compile [BACKEND]\n")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.exit(2, f"bench_ses.py: error: --device {args.device!r} is not a device (use cuda, cuda:0 or cpu)\n")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.exit(2, "bench_ses.py: error: --device cuda, but CUDA is not available on this machine; use --device cpu\n")
    why = unavailable(args.ses_solver, device)
    if why:
        p.exit(2, f"bench_ses.py: error: --ses-solver {args.ses_solver} cannot run on this device: {why}\n")
    amps = [amp_policy(device, a) for a in dict.fromkeys(args.amp)]
    batch = args.batch or (256 if device.type == "cuda" else 16)
    cuda = device.type == "cuda"
    env = dict(torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
               device=torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
               device_type=device.type, capability=list(torch.cuda.get_device_capability(device)) if cuda else None,
               torch_batches_eigh=cusolver_batched.torch_batches_eigh(), date=records.utc_now(),
               commit=records.commit(),
               command=" ".join(["python", "bench/bench_ses.py", *map(str, sys.argv[1:] if argv is None else argv)]))
    print(f"device: {env['device']}, torch {env['torch']}, CUDA {env['cuda']}, amp {', '.join(a.name for a in amps)}, "
          f"commit {env['commit']}")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        print("note: on a CPU the convolutions dominate and the solver runs on the same cores, so the overhead "
              "figures below say little about a GPU; run this on the GPU you train on")
    out = dict(env=env, batch=batch, solvers=[] if args.compiled_only else bench_solvers(device, 256, args.repeats, args.setups),
               steps=[])
    for name in args.setups:
        info = DATASETS[SETUPS[name]["dataset"]]
        data = synthetic_dataset(info["num_classes"], SETUPS[name]["size"], n_test=1,
                                 n_train=50_000 if cuda else batch * 12)[:2]  # one loader set for every precision
        for amp in amps:
            out["steps"] += bench_steps(name, device, amp, args.steps, batch, data, args.compile, args.group,
                                        tuple(args.ks), args.compiled_only, args.ses_solver)
    if args.profile:
        out["profile"] = {s: profile_step(s, device, amps[0], batch) for s in args.setups}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, out)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
