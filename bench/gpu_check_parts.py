"""The parts of bench/gpu_check.py: what each runs on a GPU and in --cpu mode, its estimate and limit,
how its figures are read back, the copies of the benchmark JSONs to keep, and the text report.

Estimates (seconds on one H100/H200 with 16 host cores, from what each part runs; not measured):
torch import + CUDA start ~5-8 s per process; the selftest solves 7 stacks x 2 dtypes (k <= 512) and
their float64 LAPACK references; hostsync runs 6 routes x (warm-up + one 0.5 s sleep) plus the
batched routes' child selftest (~8 s). A bench part runs one model in bf16 and fp16 in one process:
its solver table once (6 routes checked against float64 LAPACK and timed in 3 interleaved rounds, one
child selftest, ~12 s) and its loader's 50k images once, then per precision 12 timed variants
(baseline, k = 1, 3, 5, 10 on float32, k = 1 with each of the 6 routes fixed, the loader-fed
baseline) x 3 rounds x 10-12 steps (ResNet-18 ~10-70 ms a step: ~8 s; ResNet-50 ~70-110 ms: ~30 s)
and cuDNN autotuning: ResNet-18 ~60 s, ResNet-50 ~105 s. The compile part (ResNet-18 bf16, compiled
baseline, k = 1 and k = 10 only, on float32) pays three cold inductor compilations of the training
step (~20-30 s each). Each preflight generates its synthetic set (Tiny-ImageNet: 100k images at
64x64), compares the SES routes once on its first SES config's real matrices (one child selftest) and
times ~40 steps per config and its twin. Together ~440 s of the 458 s the parts may run in (470 s
less the 12 s kept to end the last one): the compile part, last, runs only when the others finish
within their estimates. Standard library only.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

RESULT = "GPU_CHECK_RESULT "  # the last line of a bench/gpu_probes.py probe


@dataclass
class Context:
    out: Path
    cpu: bool
    python: str
    root: Path

    @property
    def device(self) -> str:
        return "cpu" if self.cpu else "cuda"


@dataclass
class Part:
    name: str
    what: str
    gpu: Callable[[Context], list[str]]
    cpu: Callable[[Context], list[str]] | str   # the --cpu command, or why the part is skipped there
    estimate_gpu_s: int
    estimate_cpu_s: int
    limit_s: int
    parse: Callable[[Context, str], dict]
    needs: tuple[str, ...] = ("torch",)
    program: str | None = None                  # an executable the part needs on PATH
    check: Callable[[], str | None] | None = None  # another precondition: why the part cannot run, or None

    def argv(self, ctx: Context) -> list[str] | None:
        return self.cpu(ctx) if ctx.cpu and callable(self.cpu) else None if ctx.cpu else self.gpu(ctx)

    def estimate(self, ctx: Context) -> int:
        return self.estimate_cpu_s if ctx.cpu else self.estimate_gpu_s

    def skip_reason(self, ctx: Context, modules: dict) -> str | None:
        if ctx.cpu and isinstance(self.cpu, str):
            return self.cpu
        missing = [m for m in self.needs if not modules.get(m)]
        if missing:
            return f"needs {', '.join(missing)} (not installed here)"
        if self.program and shutil.which(self.program) is None:
            return f"{self.program} not found on PATH"
        return self.check() if self.check else None


def no_c_compiler() -> str | None:
    """Why torch.compile's inductor cannot build its Triton kernels here (it needs a C compiler), or None."""
    if os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang"):
        return None
    return "inductor's Triton kernels need a C compiler: none here (set CC, or install gcc or clang)"


# ----------------------------------------------------------------------------- reading figures back
def probe_result(ctx: Context, text: str) -> dict:
    lines = [line for line in text.splitlines() if line.startswith(RESULT)]
    return json.loads(lines[-1][len(RESULT):]) if lines else {}


def smi_figures(ctx: Context, text: str) -> dict:
    found = {k: re.search(pattern, text) for k, pattern in
             (("driver", r"Driver Version:\s*(\S+)"), ("cuda_driver", r"CUDA Version:\s*(\S+)"))}
    return {k: m.group(1) for k, m in found.items() if m}


def pytest_figures(ctx: Context, text: str) -> dict:
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", text)}


def bench_figures(name: str) -> Callable[[Context, str], dict]:
    def parse(ctx: Context, text: str) -> dict:
        path = ctx.out / "bench" / f"{name}.json"
        r = json.loads(path.read_text())
        env = r["env"]
        return dict(json=str(path.relative_to(ctx.out)), device=env["device"], device_type=env.get("device_type"),
                    torch=env["torch"], cuda=env["cuda"], date=env.get("date"), commit=env.get("commit"),
                    solvers={f"{s['layers']} / {s['solver']}": s["ms"] if s["ms"] is not None else f"skipped: {s['skipped']}"
                             for s in r["solvers"]},
                    steps={f"{s['amp']} {s['variant']}": dict(ms=s["ms"], vs_baseline=s["vs_baseline"], solver=s["solver"])
                           for s in r["steps"]})
    return parse


def result_figures(folder: str) -> Callable[[Context, str], dict]:
    def parse(ctx: Context, text: str) -> dict:
        found = sorted((ctx.out / folder).rglob("result.json"))
        keys = ("config", "acc", "epochs", "device", "ses_solver", "ses_solver_source")
        return {str(p.relative_to(ctx.out)): {k: json.loads(p.read_text()).get(k) for k in keys} for p in found}
    return parse


def preflight_figures(ctx: Context, text: str) -> dict:
    lines = text.splitlines()
    head = next((i for i, line in enumerate(lines) if line.startswith("config") and "step ms" in line), None)
    rows = []
    for line in lines[head + 1:] if head is not None else []:
        f = line.split()
        if len(f) < 5 or line.startswith("projected"):
            break
        rows.append(dict(config=f[0], amp=f[1], step_ms=float(f[2]), images_per_s=float(f[3]), ses_overhead_pct=f[4]))
    return dict(rows=rows, solver=[line.strip() for line in lines if "SES solver" in line],
                projected=next((line for line in lines if line.startswith("projected")), None))


# ----------------------------------------------------------------------------- the parts
def _bench(name: str, setup: str, amps: tuple[str, ...], compile_backend: str | None = None):
    def argv(ctx: Context) -> list[str]:
        tiny = ["--device", "cpu", "--steps", "1", "--group", "1", "--batch", "2", "--repeats", "1", "--ks", "1", "3"] \
            if ctx.cpu else ["--steps", "2"]
        return [ctx.python, "bench/bench_ses.py", "--setups", setup, "--amp", *amps, *tiny,
                *(["--compile", compile_backend, "--compiled-only"] if compile_backend else []),
                "--json", str(ctx.out / "bench" / f"{name}.json")]
    return argv


def _torchrun(ctx: Context, *args: str) -> list[str]:
    return [ctx.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *args]


def _cuda_tests(ctx: Context) -> list[str]:
    """The CUDA tests, without the suite's pytest.ini addopts (its `-n 2` needs pytest-xdist); on a CPU
    the same command, where they skip themselves."""
    return [ctx.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-o", "addopts=-ra",
            "tests/test_cusolver_batched.py", "tests/test_ses_solvers.py", "-k", "cuda"]


R50_ON_CPU = "ResNet-50 at 64x64 costs about 1 s per image on 2 CPU cores: left out of --cpu"
NEEDS_CUDA = "needs CUDA"
SCRIPTS = ("torch", "torchvision", "numpy")  # tqdm is optional: without it the scripts' progress bars are silent
PARTS = [
    Part("env", "versions: python, torch, CUDA, cuDNN, torchvision, devices, libcusolver and its batched entry point, commit",
         lambda c: [c.python, "bench/gpu_probes.py", "env"], lambda c: [c.python, "bench/gpu_probes.py", "env"],
         10, 5, 30, probe_result),
    Part("nvidia_smi", "nvidia-smi", lambda c: ["nvidia-smi"], lambda c: ["nvidia-smi"], 2, 1, 15, smi_figures,
         needs=(), program="nvidia-smi"),
    Part("selftest", "cusolver_batched.selftest on cuda:0 at (8,256) (3,256) (8,512) (3,512) and the generic stacks",
         lambda c: [c.python, "bench/gpu_probes.py", "selftest", "--device", "cuda:0"], NEEDS_CUDA, 15, 0, 60,
         probe_result),
    Part("hostsync", "per route: 0.5 s torch.cuda._sleep queued, then forward + backward: return vs done seconds",
         lambda c: [c.python, "bench/gpu_probes.py", "hostsync", "--device", "cuda:0"], NEEDS_CUDA, 20, 0, 60,
         probe_result),
    Part("cuda_tests", "the tests that need CUDA (pytest -k cuda; on a CPU they skip themselves)", _cuda_tests, _cuda_tests,
         25, 6, 75, pytest_figures, needs=("torch", "numpy", "pytest")),
    Part("bench_resnet18", "bench_ses.py ResNet-18 `all`, bf16 and fp16 + GradScaler (--cpu: bf16): every route, "
         "baseline, k = 1, 3, 5, 10, k = 1 with each route fixed",
         _bench("bench_resnet18", "resnet18", ("bf16", "fp16")), _bench("bench_resnet18", "resnet18", ("bf16",)),
         60, 15, 120, bench_figures("bench_resnet18"), needs=SCRIPTS),
    Part("bench_resnet50", "bench_ses.py ResNet-50 `layer4+avgpool`, bf16 and fp16 + GradScaler: every route, "
         "baseline, k = 1, 3, 5, 10, k = 1 with each route fixed",
         _bench("bench_resnet50", "resnet50", ("bf16", "fp16")), R50_ON_CPU, 105, 0, 170,
         bench_figures("bench_resnet50"), needs=SCRIPTS),
    Part("torchrun_smoke", "torchrun --standalone --nproc_per_node 1 exp10 --smoke --configs ses_k1",
         lambda c: _torchrun(c, "exp10_periodic_ses.py", "--smoke", "--device", c.device, "--configs", "ses_k1",
                             "--out-dir", str(c.out / "torchrun")),
         lambda c: _torchrun(c, "exp10_periodic_ses.py", "--smoke", "--device", c.device, "--configs", "ses_k1",
                             "--epochs", "1", "--out-dir", str(c.out / "torchrun")),
         25, 12, 60, result_figures("torchrun"), needs=SCRIPTS),
    Part("collectives", "torchrun, one process: all_gather / all_reduce / all_gather_object over NCCL (gloo on a CPU)",
         lambda c: _torchrun(c, "bench/gpu_probes.py", "collectives", "--device", c.device),
         lambda c: _torchrun(c, "bench/gpu_probes.py", "collectives", "--device", c.device), 12, 6, 45, probe_result),
    Part("exp11_preflight", "exp11_resnet50_tinyimagenet.py --preflight --synthetic --configs ses_k1 (and its twin)",
         lambda c: [c.python, "exp11_resnet50_tinyimagenet.py", "--preflight", "--synthetic", "--configs", "ses_k1",
                    "--out-dir", str(c.out / "preflight")], R50_ON_CPU, 40, 0, 90, preflight_figures, needs=SCRIPTS),
    Part("exp12_preflight", "exp12_mixup_cutmix_cifar100.py --preflight --synthetic --amp fp16 (every config; "
         "--cpu: --smoke, the mixup config at batch 2 in the CPU's own precision, fp16 autocast being slow there)",
         lambda c: [c.python, "exp12_mixup_cutmix_cifar100.py", "--preflight", "--synthetic", "--amp", "fp16",
                    "--out-dir", str(c.out / "preflight")],
         lambda c: [c.python, "exp12_mixup_cutmix_cifar100.py", "--preflight", "--smoke", "--configs", "mixup",
                    "--batch-size", "2", "--attack-batch-size", "2", "--out-dir", str(c.out / "preflight")],
         40, 8, 90, preflight_figures, needs=SCRIPTS),
    Part("bench_resnet18_compile", "bench_ses.py ResNet-18 `all`, bf16, --compile inductor --compiled-only "
         "(compiled baseline, k = 1, k = 10; the eager ones are bench_resnet18's)",
         _bench("bench_resnet18_compile", "resnet18", ("bf16",), "inductor"),
         "inductor compiles for minutes on a CPU (tests/test_bench.py runs bench_ses --compile eager there)",
         85, 0, 150, bench_figures("bench_resnet18_compile"), needs=SCRIPTS, check=no_c_compiler),
]


# ----------------------------------------------------------------------------- what to keep, the text
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def result_name(fig: dict, part: str) -> str:
    """<gpu>_torch<version>_<UTC date and time>_<commit>_<part>.json: a later run (an "after") never
    overwrites an earlier one (a "before")."""
    stamp = re.sub(r"[^0-9T]", "", (fig.get("date") or "")[:16]) or "nodate"
    return f"{_slug(fig['device'])}_torch{_slug(fig['torch'])}_{stamp}_{_slug(fig.get('commit') or 'nocommit')}_" \
           f"{part.removeprefix('bench_')}.json"


def keep_results(ctx: Context, report: dict) -> list[str]:
    """Copies of the CUDA benchmark JSONs under results/, named by result_name (none from a CPU)."""
    kept = []
    for rec in report["parts"]:
        fig = rec["figures"]
        if rec["status"] != "ok" or fig.get("device_type") != "cuda" or "json" not in fig:
            continue
        name = result_name(fig, rec["name"])
        (ctx.out / "results").mkdir(exist_ok=True)
        shutil.copyfile(ctx.out / fig["json"], ctx.out / "results" / name)
        kept.append(f"results/{name}")
    return kept


def _pct(x) -> str:
    return f"{100 * x:+.1f} %" if isinstance(x, (int, float)) else "-"


def _details(rec: dict) -> list[str]:
    fig, out = rec["figures"], []
    if rec["name"] == "hostsync":
        for route, r in fig.get("routes", {}).items():
            out.append(f"    {route:<10} " + (f"skipped: {r['skipped']}" if "skipped" in r else
                       f"returns after {r['return_s']:.3f} s, done after {r['done_s']:.3f} s: "
                       f"{'the host waits for the GPU' if r['host_waits_for_gpu'] else 'returns at once'}"
                       + (f", host workspace {r['host_workspace_bytes']} B" if "host_workspace_bytes" in r else "")))
    elif rec["name"].startswith("bench_") and "steps" in fig:
        out += [f"    solver {k:<36} " + (f"{v:8.2f} ms" if isinstance(v, (int, float)) else v) for k, v in fig["solvers"].items()]
        out += [f"    step   {k:<27} " + (f"{v['ms']:8.2f} ms {_pct(v['vs_baseline']):>9}" if v["ms"] is not None
                                               else f"{'not run':>21}") + f"  solver {v['solver']}"
                for k, v in fig["steps"].items()]
    elif rec["name"].endswith("_preflight"):
        out += [f"    {line}" for line in fig.get("solver", [])]
        out += [f"    {r['config']:<12} {r['amp']:>5} {r['step_ms']:8.1f} ms {r['images_per_s']:8.0f} img/s  SES {r['ses_overhead_pct']} %"
                for r in fig.get("rows", [])]
        out += [f"    {fig['projected']}"] if fig.get("projected") else []
    elif fig and rec["name"] not in ("env",):
        out.append("    " + json.dumps(fig)[:600])
    return out


def as_text(report: dict) -> str:
    lines = [f"{report['check']}  ({report['mode']} mode)  started {report['started']}, "
             f"{report.get('seconds', 0):.0f} s of a {report['budget_s']} s budget",
             "modules: " + ", ".join(f"{m} {'yes' if ok else 'MISSING'}" for m, ok in report["modules"].items()), ""]
    env = next((r["figures"] for r in report["parts"] if r["name"] == "env"), {})
    if env:
        lines += [f"torch {env.get('torch')} CUDA {env.get('cuda')} cuDNN {env.get('cudnn')} torchvision "
                  f"{env.get('torchvision')}; batched eigh one XsyevBatched call: {env.get('torch_batches_eigh')}; "
                  f"libcusolver {env.get('libcusolver')} ({env.get('batched_entry_point')}); devices {env.get('devices')}", ""]
    for rec in report["parts"]:
        took = f"{rec['seconds']:6.1f} s (estimate {rec['estimate_s']} s, limit {rec['limit_s']} s)" \
            if rec["status"] != "skipped" else ""
        tail = rec.get("reason") or (rec["last_line"] if rec["status"] != "ok" else "")
        lines.append(f"{rec['name']:<28} {rec['status']:<8} {took}  {tail}".rstrip())
        if rec["command"]:
            lines.append(f"    $ {rec['command']}")
        lines += _details(rec)
    if report.get("results"):
        lines += ["", "to keep the measurements: mkdir -p bench/results && cp " +
                  " ".join(f"{report['out']}/{p}" for p in report["results"]) + " bench/results/ && python bench/cost_table.py"]
    return "\n".join(lines) + "\n"
