"""--preflight: will the sweep fit this card, and what will it cost? Writes no run folder.

Per selected config, at its real batch sizes: a few training steps with SES as configured (the
steps cover whole SES periods), the same for its plain twin (SES off) in the same process for the
overhead, then one chunk of every end-of-run stage (evaluation, noise, FGSM, train accuracy,
entropy probe) and one checkpoint write to a temporary folder. Printed per config: step time,
images/s, SES overhead, peak memory of training and of the final stage against the device's
total memory, the estimate of the training peak made before measuring (harness.memory; a config
whose estimate does not fit gets its one line saying what does first), and the projected time per
run; then the projected time of the whole sweep. Memory is max_memory_allocated (tensors only:
the CUDA context and cuDNN workspaces take a few hundred MiB more), so leave ~10 % headroom.
SES solver route: on CUDA, before the first SES config is timed, the routes are compared on that
config's real Gram matrices and the result is recorded for this GPU in <out-dir>/<experiment>/ses_solver_routes.json
(harness/solver_route.py), the one file it writes; every config's steps are then timed with the
route a sweep on this GPU will use.
"""
from __future__ import annotations

import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from data_utils import DataError
from harness.config import resolve_config
from harness.memory import FIT
from harness.evaluation import NonFiniteActivations, evaluate, fgsm, gaussian_noise, measure_entropy
from harness import multigpu
from harness.checkpoints import save_checkpoint
from harness.runs import build_run
from plumbing import gpu
from harness import solver_route
from harness.memory import fit_check
from harness.run_data import dataset_for
from harness.sweep import contained
from harness.training import train_epoch

GiB = 2 ** 30


def time_steps(run, steps: int, warmup: int = 10) -> float:
    """Median seconds per training step over `steps` steps after `warmup`, in groups of whole
    SES periods (a k=10 config is timed over 10-step groups)."""
    k = run.ses.every if run.ses is not None else 1
    group = max(k, 1)
    reps = max(2, math.ceil(steps / group))
    train_epoch(run.train_model, run.loader, 0, run.opt, run.scaler, run.amp, run.ses, run.mixer, max_steps=warmup,
                clip_grad=run.cfg["clip_grad"], shard=run.shard)
    times = []
    for r in range(reps):
        gpu.synchronize(run.device)
        t0 = time.perf_counter()
        done = train_epoch(run.train_model, run.loader, 1 + r, run.opt, run.scaler, run.amp, run.ses, run.mixer,
                           max_steps=group, clip_grad=run.cfg["clip_grad"], shard=run.shard)["steps"]
        gpu.synchronize(run.device)
        times.append((time.perf_counter() - t0) / done)
    return statistics.median(times)


def time_chunk(fn, device) -> float:
    fn()  # warm-up (cuDNN autotuning)
    gpu.synchronize(device)
    t0 = time.perf_counter()
    fn()
    gpu.synchronize(device)
    return time.perf_counter() - t0


def measure(cfg: dict, data, device, reg, steps: int, compile_backend: str | None = None, warmup: int = 10,
            route=None) -> dict:
    run = build_run(cfg, data, device, reg, compile_backend, route)
    try:
        gpu.reset_peak(device)
        step_s = time_steps(run, steps, warmup)
        peak_train = gpu.peak(device)
        gpu.reset_peak(device)
        d, amp = run.data, run.amp
        with run.paused():
            ebs, abs_ = cfg["eval_batch_size"], cfg["attack_batch_size"]
            t_eval = time_chunk(lambda: evaluate(run.model, d.test_x, d.test_y, amp, ebs, max_batches=1), device)
            t_noise = time_chunk(lambda: evaluate(run.model, d.test_x, d.test_y, amp, ebs,
                                                  gaussian_noise(0.1, d.is_image), max_batches=1), device)
            t_fgsm = time_chunk(lambda: evaluate(run.model, d.test_x, d.test_y, amp, abs_,
                                                 fgsm(1 / 255, d.is_image), max_batches=1), device)
            probe_note = None
            try:
                t_probe = time_chunk(lambda: measure_entropy(run.model, run.layers, run.probe_x, amp), device)
            except NonFiniteActivations:  # eval mode after a few steps: BatchNorm statistics not yet trained
                t_probe, probe_note = 0.0, "probe batch non-finite in eval mode after a few steps (BatchNorm " \
                                           "statistics untrained); not timed"
        peak_final = gpu.peak(device)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            save_checkpoint(run, Path(tmp) / "checkpoint.pt", 0, [])
            t_ckpt = time.perf_counter() - t0
            ckpt_mb = (Path(tmp) / "checkpoint.pt").stat().st_size / 2 ** 20
        n_test = len(d.test_y)
        n_eval = len(d.val_y) if d.val_y is not None else n_test
        per_epoch = (len(run.loader) * step_s + math.ceil(n_eval / ebs) * t_eval + t_probe + t_ckpt)
        final = (math.ceil(n_test / ebs) * (t_eval + len(cfg["noise_sigmas"]) * t_noise)
                 + math.ceil(n_test / abs_) * len(cfg["fgsm_eps"]) * t_fgsm
                 + math.ceil(min(cfg["train_eval_size"], len(d.train_y)) / ebs) * t_eval + t_probe)
        per_gpu = multigpu.gather_objects((gpu.name(device), peak_train, peak_final))
        peak_train = max(p[1] for p in per_gpu) if peak_train is not None else None
        peak_final = max(p[2] for p in per_gpu) if peak_final is not None else None
        return dict(note=probe_note, step_s=step_s, images_per_s=cfg["batch_size"] / step_s, peak_train=peak_train,
                    peak_final=peak_final, per_gpu=per_gpu if len(per_gpu) > 1 else None, ckpt_mb=ckpt_mb, run_s=cfg["epochs"] * per_epoch + final,
                    amp=amp.name, steps_per_epoch=len(run.loader))
    finally:
        run.close()


def fmt_mem(b, total) -> str:
    if b is None:
        return "-"
    return f"{b / GiB:.2f}" + (f" ({100 * b / total:.0f}%)" if total else "")


def preflight(experiment: str, grid: dict, setup: dict, args, overrides: dict, reg, steps: int = 30) -> int:
    """The preflight table of every selected config; 1 if any config failed or does not fit.
    With --smoke (a CPU check of the preflight itself) 1 warm-up and 2 timed steps, not 10 and 30."""
    warmup = 1 if args.smoke else 10
    steps = 2 if args.smoke else steps
    device = torch.device(args.device)
    gpu.use(device)  # an explicit --device cuda:1 never touches GPU 0
    total = gpu.total_memory(device)
    print(f"preflight of {experiment} on {gpu.describe(device)}" + ("; synthetic data" if args.synthetic else ""))
    route, measured = solver_route.settle(args, device, experiment), False  # the sweep's route; on CUDA measured below
    rows, data_cache, base_cache, failed, too_big = [], {}, {}, [], []
    for config in args.configs:
        cfg, _ = resolve_config(experiment, setup, grid, config, args.seeds[0], args.smoke, overrides, reg.settings)
        try:
            estimate = fit_check([cfg], experiment, args, reg, device).get(cfg["variant"])
            data = dataset_for(cfg, args, reg, data_cache, device)
            if cfg["ses"] and not measured and solver_route.measured_on(device):  # the first SES config
                route, measured = solver_route.measure(cfg, data, device, reg, args), True
            m = measure(cfg, data, device, reg, steps, args.compile, warmup, route)
            m["estimate"] = estimate.peak() if estimate else None
            if cfg["ses"]:
                twin = dict(cfg, ses=False)
                tkey = repr(sorted((k, str(v)) for k, v in twin.items() if k not in ("config", "variant")))
                if tkey not in base_cache:
                    base_cache[tkey] = measure(twin, data, device, reg, steps, args.compile, warmup)["step_s"]
                m["overhead"] = m["step_s"] / base_cache[tkey] - 1
        except DataError:
            raise  # no config of this dataset can be measured: the preflight ends with the data's one line
        except Exception as e:  # noqa: BLE001 - one config's problem is one line, the others still run
            if isinstance(e, torch.OutOfMemoryError):
                print(f"  {config}: OUT OF MEMORY at batch {cfg['batch_size']} / attack chunk "
                      f"{cfg['attack_batch_size']}: lower --batch-size or --attack-batch-size")
                gpu.free_cached(device)
            else:
                print(f"  {config}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
            failed.append(config)
            if isinstance(e, torch.OutOfMemoryError):
                too_big.append(config)
            if not contained(e):
                # this rank alone failed, where the others may wait in a collective: they cannot go on in step
                print(f"error: rank {multigpu.current().rank} failed during the preflight of {config}; under torchrun "
                      f"the preflight ends here", file=sys.stderr)
                raise SystemExit(1) from None
            continue
        if m.get("note"):
            print(f"  {config}: {m['note']}")
        if m.get("per_gpu"):  # torchrun: every process's peaks (the table shows the largest)
            print(f"  {config}: per GPU (train / final GiB): " + ", ".join(
                f"rank {r} {name} {fmt_mem(t, None)} / {fmt_mem(f, None)}" for r, (name, t, f) in enumerate(m["per_gpu"])))
        rows.append((config, m, len(args.seeds)))
        peak = max(m["peak_train"] or 0, m["peak_final"] or 0)
        if total and peak > FIT * total:
            too_big.append(config)
    w = max([len(r[0]) for r in rows] + [8]) + 2
    print(f"{'config':<{w}}{'amp':>5}{'step ms':>9}{'img/s':>8}{'SES +%':>8}{'train GiB':>16}{'est. GiB':>9}"
          f"{'final GiB':>16}{'ckpt MB':>9}{'h/run':>7}")
    for config, m, _ in rows:
        over = f"{100 * m['overhead']:+.1f}" if "overhead" in m else "-"
        print(f"{config:<{w}}{m['amp']:>5}{1e3 * m['step_s']:9.1f}{m['images_per_s']:8.0f}{over:>8}"
              f"{fmt_mem(m['peak_train'], total):>16}{fmt_mem(m['estimate'], None):>9}"
              f"{fmt_mem(m['peak_final'], total):>16}{m['ckpt_mb']:9.0f}"
              f"{m['run_s'] / 3600:7.2f}")
    sweep_h = sum(m["run_s"] * n for _, m, n in rows) / 3600
    print(f"projected sweep: {sweep_h:.1f} h for {sum(n for *_, n in rows)} measured run(s) on this device"
          + ("" if not total else f"; {fit_verdict(rows, too_big, total)}")
          + (f"; not measured: {', '.join(c for c in failed if c not in too_big)} (see above)"
             if set(failed) - set(too_big) else ""))
    return 1 if failed or too_big else 0


def fit_verdict(rows: list, too_big: list, total: int) -> str:
    """FITS / DOES NOT FIT in the card's memory, from the configs measured (tensors only) and those that
    ran out of memory; nothing to say when no config was measured and none ran out of memory."""
    card = f"{total / GiB:.1f} GiB"
    if too_big:
        return f"DOES NOT FIT in {card}: {', '.join(too_big)} (peaks above {100 * FIT:.0f} % or out of memory)"
    if not rows:
        return f"no config measured, so no verdict on {card}"
    return f"FITS in {card} (peaks above include tensors only; keep ~10 % headroom)"
