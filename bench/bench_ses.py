"""Benchmark: SES penalty cost, and a ResNet-18 CIFAR training step with and without SES.

    python bench/bench_ses.py                 # on CUDA if available, else CPU
    python bench/bench_ses.py --device cpu --steps 5

1. Penalty forward + backward, project route (Gram matrix when n < d, equal sizes batched into
   one eigvalsh) vs the textbook route (d x d covariance, one eigvalsh per layer), for
   ResNet-50 layer4+avgpool shapes 4 x (256, 2048) and ResNet-18 `all` shapes (n = 256).
2. One training step of the CIFAR ResNet-18 (batch 256 on CUDA, 64 on CPU) under the suite's
   AMP policy, plain CE vs CE + SES k = 1 on the 9 `all` hooks. Prints medians; no assertions.
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
from data_utils import DATASETS  # noqa: E402
from ses_core import SES, ses_penalty  # noqa: E402
from train_utils import DEFAULTS, amp_policy, build_resnet, resolve_layers  # noqa: E402

R50_SHAPES = [(256, 2048)] * 4
R18_SHAPES = [(256, d) for d in (64, 64, 128, 128, 256, 256, 512, 512, 512)]


def textbook_penalty(acts, beta):
    """The direct formula: d x d covariance per layer, eigvalsh, entropy; float32."""
    r = 0.0
    for a in acts:
        x = a.float() - a.float().mean(0)
        lam = torch.linalg.eigvalsh(x.T @ x / (len(x) - 1)).clamp_min(0)
        p = lam / lam.sum()
        h = -(p * torch.log(p.clamp_min(1e-30))).sum()
        r = r + (h - beta * math.log(a.shape[1])) ** 2
    return r


def timed(fn, device, repeats):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_penalty(device, repeats):
    for label, shapes in (("ResNet-50 layer4+avgpool 4x(256,2048)", R50_SHAPES),
                          ("ResNet-18 all-9 (n=256)", R18_SHAPES)):
        g = torch.Generator(device="cpu").manual_seed(0)
        acts = [torch.randn(n, d, generator=g).to(device).requires_grad_(True) for n, d in shapes]

        def run(route):
            def f():
                route(acts, 0.7).backward()
            return f
        t_proj = timed(run(ses_penalty), device, repeats)
        t_text = timed(run(textbook_penalty), device, repeats)
        diff = abs(ses_penalty(acts, 0.7).item() - textbook_penalty(acts, 0.7).item())
        print(f"penalty fwd+bwd  {label:<40} project {1e3 * t_proj:9.2f} ms   textbook {1e3 * t_text:9.2f} ms"
              f"   speed-up {t_text / t_proj:6.1f}x   |R diff| {diff:.2e}")


def bench_step(device, steps, batch):
    amp = amp_policy(device)
    cfg = dict(DEFAULTS, model="resnet18", layers="all")
    x = torch.rand(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (batch,), device=device)
    results = {}
    for name in ("plain CE", "CE + SES k=1"):
        torch.manual_seed(0)
        model = build_resnet(cfg, DATASETS["cifar100"]).to(device, memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        scaler = amp.scaler()
        ses = SES(model, resolve_layers(cfg, model), 0.01, 0.7, 1) if name != "plain CE" else None

        def step():
            if ses:
                ses.begin_step()
            with amp.autocast():
                loss = F.cross_entropy(model(x), y)
            loss = loss + (ses.penalty() if ses else 0.0)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        results[name] = timed(step, device, steps)
        print(f"train step  ResNet-18 CIFAR batch {batch} {amp.name}  {name:<14} {1e3 * results[name]:9.1f} ms")
    print(f"SES k=1 step overhead: {100 * (results['CE + SES k=1'] / results['plain CE'] - 1):+.1f} %")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats of the penalty")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per variant")
    p.add_argument("--batch", type=int, help="training batch (default 256 on CUDA, 64 on CPU)")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    else:
        print(f"device: CPU ({torch.get_num_threads()} threads), torch {torch.__version__}")
    bench_penalty(device, args.repeats)
    bench_step(device, args.steps, args.batch or (256 if device.type == "cuda" else 64))


if __name__ == "__main__":
    main()
