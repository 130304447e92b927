"""What a GPU should check, in one command of at most 8 minutes (run by bench/gpu_check.sh):

    bash bench/gpu_check.sh [OUT]          on a CUDA machine (default OUT: ./gpu_check_out)
    bash bench/gpu_check.sh --cpu [OUT]    the same parts on a CPU with tiny sizes (a rehearsal, not a measurement)

Needs only torch (and torchvision, numpy, tqdm for the benchmark and the experiment scripts); no
package registry. A missing module, a failing or hanging part is recorded and the check goes on.
Each part runs as its own process group with its own time limit, all within BUDGET_S seconds, in
order of value (the parts run last are the ones a short budget can spare); a part that would start
with less of the budget left than its estimate (or MIN_PART_S) is recorded as skipped. Writes, under OUT:
    gpu_check.json   every part: command, status (ok / failed / timeout / skipped), exit code, seconds,
                     the estimate and limit it ran under, its log, the figures parsed from it
    gpu_check.txt    the same as text, with the benchmark and host-sync tables
    logs/<part>.log  each part's output; bench/<part>.json the benchmark's own JSON
    results/<gpu>_torch<version>_<setup>_<amp>[_compile].json   (CUDA only) copies of those benchmark
                     JSONs, to keep under bench/results/ for bench/cost_table.py
The JSON is rewritten (atomically) after every part, so a check cut short keeps what it did.
The estimates are estimates (from what each part runs), not measurements; the JSON records the seconds
each part really took. Standard library only.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gpu_check_parts as parts_mod

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 470          # all parts together: 8 minutes less time to start and to write the files
MIN_PART_S = 10
MODULES = ("torch", "torchvision", "numpy", "tqdm", "pytest", "tensorboard", "matplotlib", "h5py")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_atomic(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name + ".", suffix=".tmp", delete=False) as f:
        f.write(text)
    os.replace(f.name, path)


def run_part(argv: list[str], log: Path, limit: float, cpu: bool = False) -> tuple[str, int | None]:
    """(status, exit code) of `argv` run from the repository root in its own process group, output to `log`;
    on `limit` the whole group is ended (SIGTERM, then SIGKILL after 5 s). `cpu`: one OpenMP thread per
    process unless OMP_NUM_THREADS is set (on a small shared CPU, threads waiting on each other at every
    tiny op make the rehearsal's steps several times slower)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if cpu:
        env.setdefault("OMP_NUM_THREADS", "1")
    with open(log, "w") as f:
        try:
            proc = subprocess.Popen(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        except OSError as e:
            f.write(f"could not start: {e}\n")
            return "failed", None
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=grace)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
            f.write(f"\n[gpu_check] ended after its limit of {limit:.0f} s\n")
            return "timeout", proc.returncode
    return ("ok" if code == 0 else "failed"), code


def last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines()
             if line.strip() and not line.startswith(parts_mod.RESULT)]
    return lines[-1].strip()[:300] if lines else ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default="gpu_check_out", help="output folder (default ./gpu_check_out)")
    p.add_argument("--cpu", action="store_true", help="rehearse on a CPU: tiny sizes, CUDA-only parts skipped")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    for sub in ("logs", "bench"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    modules = {m: importlib.util.find_spec(m) is not None for m in MODULES}
    ctx = parts_mod.Context(out=out, cpu=args.cpu, python=sys.executable, root=ROOT)
    report = dict(check="bash bench/gpu_check.sh" + (" --cpu" if args.cpu else "") + f" {args.out}",
                  mode="cpu" if args.cpu else "gpu", out=str(out), started=now(), budget_s=BUDGET_S, modules=modules,
                  parts=[], results=[])
    t_start = time.monotonic()
    no_cuda = None
    for part in parts_mod.PARTS:
        rec = dict(name=part.name, what=part.what, estimate_s=part.estimate(ctx), limit_s=None, command=None,
                   status="skipped", exit_code=None, seconds=0.0, log=None, last_line="", figures={})
        left = BUDGET_S - (time.monotonic() - t_start)
        argv_ = part.argv(ctx)
        why = part.skip_reason(ctx, modules) or no_cuda
        if why is None and argv_ is None:
            why = "nothing to run in this mode"
        if why is None and left < max(MIN_PART_S, rec["estimate_s"]):
            why = f"the {BUDGET_S} s budget is spent: {left:.0f} s left, the part's estimate is {rec['estimate_s']} s"
        if why:
            rec["reason"] = why
        else:
            log = out / "logs" / f"{part.name}.log"
            rec.update(command=shlex.join(argv_), limit_s=round(min(part.limit_s, left)), log=str(log.relative_to(out)))
            t0 = time.monotonic()
            rec["status"], rec["exit_code"] = run_part(argv_, log, rec["limit_s"], args.cpu)
            rec["seconds"] = round(time.monotonic() - t0, 1)
            rec["last_line"] = last_line(log)
            try:
                rec["figures"] = part.parse(ctx, log.read_text(errors="replace")) or {}
            except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
                rec["figures"] = {"parse_error": f"{type(e).__name__}: {e}"}
            if part.name == "env" and not args.cpu and rec["figures"].get("cuda_available") is False:
                no_cuda = "CUDA is not available here (bash bench/gpu_check.sh --cpu rehearses the check on a CPU)"
        report["parts"].append(rec)
        report["seconds"] = round(time.monotonic() - t_start, 1)
        report["finished"] = now()
        write_atomic(out / "gpu_check.json", json.dumps(report, indent=2) + "\n")
    report["results"] = parts_mod.keep_results(ctx, report)
    write_atomic(out / "gpu_check.json", json.dumps(report, indent=2) + "\n")
    write_atomic(out / "gpu_check.txt", parts_mod.as_text(report))
    print(parts_mod.as_text(report), end="")
    if no_cuda:
        print(f"gpu_check: {no_cuda}", file=sys.stderr)
        return 2
    return 0 if all(r["status"] in ("ok", "skipped") for r in report["parts"]) else 1


if __name__ == "__main__":
    sys.exit(main())
