"""What a GPU should check, in one command of at most 8 minutes (run by bench/gpu_check.sh):

    bash bench/gpu_check.sh [OUT]          on a CUDA machine (default OUT: ./gpu_check_out)
    bash bench/gpu_check.sh --cpu [OUT]    the same parts on a CPU with tiny sizes (a rehearsal, not a measurement)
    bash bench/gpu_check.sh --only hostsync,bench_resnet18 [OUT]    those parts only (env always runs)

Needs only torch (and torchvision, numpy for the benchmark and the experiment scripts; tqdm, pytest and
the rest are optional); no package registry. A missing module, a failing or hanging part is recorded and
the check goes on. Each part runs as its own process group with its own time limit, all within
BUDGET_S seconds, in order of value (the parts run last are the ones a short budget can spare); a part
that would start with less of the budget left than its estimate (or MIN_PART_S) is recorded as
skipped, and no part's limit reaches past the budget less KILL_S (the time to end it). Every process a
part starts carries the part's tag in its environment (TAG_VAR), so when the part ends, by itself or
at its limit, whatever it left running is killed, torchrun's workers included (they run in sessions
of their own, out of reach of the part's process group). Exit code 0 when every part ran or was
skipped for a reason, 1 when a part failed or timed out, 2 (with one line saying why) when torch is
missing, the env part failed, or (GPU mode) CUDA is not available. Writes, under OUT:
    gpu_check.json   every part: command, status (ok / failed / timeout / skipped), exit code, seconds,
                     the estimate and limit it ran under, its log, the figures parsed from it
    gpu_check.txt    the same as text, with the benchmark and host-sync tables
    logs/<part>.log  each part's output; bench/<part>.json the benchmark's own JSON
    results/<gpu>_torch<version>_<UTC date+time>_<commit>_<part>.json   (CUDA only) copies of those
                     benchmark JSONs, to keep under bench/results/ for bench/cost_table.py
The JSON is rewritten (atomically) after every part, so a check cut short keeps what it did.
The estimates are estimates (from what each part runs), not measurements; the JSON records the seconds
each part really took. Standard library only.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import gpu_check_parts as parts_mod
from records import utc_now as now, write_atomic

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 470          # all parts together: 8 minutes less time to start and to write the files
MIN_PART_S = 10
KILL_S = 12             # SIGTERM, 5 s, SIGKILL, 5 s, and the sweep for tagged processes
TAG_VAR = "GPU_CHECK_PART"
MODULES = ("torch", "torchvision", "numpy", "tqdm", "pytest", "tensorboard", "matplotlib", "h5py")


def tagged(tag: str) -> list[int]:
    """Pids of the live processes whose environment holds TAG_VAR=tag (Linux /proc; [] elsewhere)."""
    want, pids = f"{TAG_VAR}={tag}".encode(), []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if want in (d / "environ").read_bytes().split(b"\0"):
                pids.append(int(d.name))
        except (OSError, ValueError):  # gone, or not ours to read
            continue
    return pids


def kill_tagged(tag: str) -> int:
    """SIGKILL every process tagged `tag` until none is left (a dying parent may start no more); how many."""
    killed: set[int] = set()
    for _ in range(20):
        pids = [pid for pid in tagged(tag) if pid != os.getpid()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.05)
    return len(killed)


def run_part(argv: list[str], log: Path, limit: float, cpu: bool = False) -> tuple[str, int | None, int]:
    """(status, exit code, processes left behind and killed) of `argv` run from the repository root in
    its own process group, output to `log`, every process it starts tagged (TAG_VAR); on `limit` the
    group is ended (SIGTERM, then SIGKILL after 5 s), and whatever tagged process is still alive after
    the part (torchrun's workers run in sessions of their own) is killed. `cpu`: one OpenMP thread per
    process unless OMP_NUM_THREADS is set (on a small shared CPU, threads waiting on each other at every
    tiny op make the rehearsal's steps several times slower)."""
    tag = uuid.uuid4().hex
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{TAG_VAR: tag})
    if cpu:
        env.setdefault("OMP_NUM_THREADS", "1")
    with open(log, "w") as f:
        try:
            proc = subprocess.Popen(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        except OSError as e:
            f.write(f"could not start: {e}\n")
            return "failed", None, 0
        try:
            code, status = proc.wait(timeout=limit), None
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=grace)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
            f.write(f"\n[gpu_check] ended after its limit of {limit:.0f} s\n")
            code, status = proc.returncode, "timeout"
        left = kill_tagged(tag)
        if left:
            f.write(f"\n[gpu_check] killed {left} process(es) the part left running\n")
    return status or ("ok" if code == 0 else "failed"), code, left


def last_line(log: Path) -> str:
    """The part's last line that names an error (pytest's usage error, a traceback's last line), else its last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()
             if line.strip() and not line.startswith(parts_mod.RESULT) and not line.startswith("[gpu_check]")]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [""])[-1][:300]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default="gpu_check_out", help="output folder (default ./gpu_check_out)")
    p.add_argument("--cpu", action="store_true", help="rehearse on a CPU: tiny sizes, CUDA-only parts skipped")
    p.add_argument("--only", metavar="PART,...", help="run only these parts (env always runs): "
                   + ", ".join(part.name for part in parts_mod.PARTS))
    args = p.parse_args(argv)
    only = set(args.only.split(",")) | {"env"} if args.only else None
    unknown = sorted(only - {part.name for part in parts_mod.PARTS}) if only else []
    if unknown:
        p.exit(2, f"gpu_check.py: error: --only: no part named {', '.join(unknown)}; the parts: "
                  f"{', '.join(part.name for part in parts_mod.PARTS)}\n")
    out = Path(args.out).resolve()
    for sub in ("logs", "bench"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    modules = {m: importlib.util.find_spec(m) is not None for m in MODULES}
    ctx = parts_mod.Context(out=out, cpu=args.cpu, python=sys.executable, root=ROOT)
    report = dict(check="bash bench/gpu_check.sh" + (" --cpu" if args.cpu else "")
                  + (f" --only {args.only}" if args.only else "") + f" {args.out}",
                  mode="cpu" if args.cpu else "gpu", out=str(out), started=now(), budget_s=BUDGET_S, modules=modules,
                  parts=[], results=[])
    t_start = time.monotonic()
    no_cuda = None
    for part in parts_mod.PARTS:
        rec = dict(name=part.name, what=part.what, estimate_s=part.estimate(ctx), limit_s=None, command=None,
                   status="skipped", exit_code=None, seconds=0.0, log=None, last_line="", figures={})
        left = BUDGET_S - KILL_S - (time.monotonic() - t_start)  # what a part may run, keeping the time to end it
        argv_ = part.argv(ctx)
        why = ("not asked for (--only)" if only is not None and part.name not in only else None) \
            or part.skip_reason(ctx, modules) or no_cuda
        if why is None and argv_ is None:
            why = "nothing to run in this mode"
        if why is None and left < max(MIN_PART_S, rec["estimate_s"]):
            why = (f"the {BUDGET_S} s budget is spent: {left:.0f} s left to run in ({KILL_S} s more kept to end a part), "
                   f"the part's estimate is {rec['estimate_s']} s")
        if why:
            rec["reason"] = why
        else:
            log = out / "logs" / f"{part.name}.log"
            rec.update(command=shlex.join(argv_), limit_s=round(min(part.limit_s, left)), log=str(log.relative_to(out)))
            t0 = time.monotonic()
            rec["status"], rec["exit_code"], rec["left_running_killed"] = run_part(argv_, log, rec["limit_s"], args.cpu)
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
    env = next((r for r in report["parts"] if r["name"] == "env"), None)
    if not modules.get("torch"):
        why = f"torch is not installed for {sys.executable} (set PYTHON=/path/to/a/python with torch)"
    elif env is not None and env["status"] != "ok":
        why = f"the env part {env['status']}: {env['last_line'] or env.get('reason')} (see {out}/logs/env.log)"
    else:
        why = no_cuda
    if why:
        print(f"gpu_check: {why}", file=sys.stderr)
        return 2
    return 0 if all(r["status"] in ("ok", "skipped") for r in report["parts"]) else 1


if __name__ == "__main__":
    sys.exit(main())
