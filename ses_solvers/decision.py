"""Which SES solver route a process trains with, decided once before its first training step, and the
record of what --preflight measured on a GPU.

decide(device, requested="auto", records=None) -> Route(name, source, shape); it times nothing:
    a route the user names   that route if it can run on `device` (routes.unavailable: for a batched
                             route, cusolver_batched's selftest in a child process, once per device),
                             else RouteError with one line
    auto on a CPU            "float32"
    auto on CUDA             the route --preflight recorded in `records` for this GPU name, torch
                             version and CUDA version, if it can run here (the same check); else
                             "float32", plain torch.linalg.eigvalsh
`source` says in one line where the route comes from (result.json's ses_solver_source). The same
inputs give the same route, so every run of a sweep on one machine solves by one route.

measure(grams, records, of_spectrum, **context) is --preflight's measurement on a config's real Gram
matrices (of_spectrum: what SES computes from the eigenvalues, its H; see routes.compare_routes):
routes.compare_routes (each route checked against float64 LAPACK, left out with why if it is off,
fails or cannot run; the rest timed), routes.choose_route (float32 unless another route takes at most
90 % of its time), written into `records` under this machine's key. The file is read, the entry set,
and the whole written to a temp file that replaces it (os.replace): a reader sees the old file or the
new one. Its JSON, <out-dir>/<experiment>/ses_solver_routes.json (one per experiment):
    {"<GPU name> | torch <version> | CUDA <version>": {"gpu", "torch", "cuda", "route", "date" (UTC),
     "sizes" (of the Grams), "shape" ([B, k] of their padded stack), "timings_s" (route -> seconds per
     forward + backward), "rejected" (route -> why), "margin", and the context (experiment, config, batch)}}
Host syncs: both run before any training step. decide, for a batched cuSOLVER route, checks it where it
would run (cusolver_batched's selftest: device work it waits for, and a child process the first time);
for float32 and host it touches no device. measure waits for the device (its timing events and H).
"""
from __future__ import annotations

import datetime
from pathlib import Path
from typing import NamedTuple

import torch

from plumbing import gpu
from plumbing.files import read_json, write_json
from ses_solvers.routes import (ROUTES, SOLVERS, choose_route, compare_routes, describe_choice, padded_shape,
                                unavailable)

RECORDS = "ses_solver_routes.json"  # in the experiment folder of the out-dir
ON_CPU = "torch.linalg.eigvalsh (on a CPU no other route is measured)"
DEFAULT = "torch.linalg.eigvalsh (the default; --preflight measures the other routes on this GPU)"


class Route(NamedTuple):
    name: str    # one of ROUTES
    source: str  # where it comes from, in one line
    shape: tuple[int, int] | None = None  # the (B, k) a recorded batched route was checked at (other ranks too)


class RouteError(ValueError):
    """A route the user named cannot run here; the message says why, in one line."""


def machine_key(device) -> str:
    """What a record is kept under: the GPU's name, torch's version and its CUDA version."""
    return f"{gpu.name(device)} | torch {torch.__version__} | CUDA {torch.version.cuda}"


def recorded(records, device) -> dict | None:
    """The preflight's entry for this machine in the file `records`, or None (no file, an unreadable one,
    no entry, or an entry naming no known route)."""
    table = read_json(records) if records is not None else None
    entry = table.get(machine_key(device)) if isinstance(table, dict) else None
    return entry if isinstance(entry, dict) and entry.get("route") in ROUTES else None


def _ms(timings: dict, route: str) -> str:
    t = timings.get(route)
    return f"{route} {1e3 * t:.1f} ms" if isinstance(t, (int, float)) else route


def summary(entry: dict) -> str:
    """'measured by --preflight on <date> (<experiment> <config>, batch <n>): <route> x ms vs float32 y ms'."""
    timings = entry.get("timings_s") if isinstance(entry.get("timings_s"), dict) else {}
    route, where = entry["route"], " ".join(str(entry[k]) for k in ("experiment", "config") if entry.get(k))
    where += f", batch {entry['batch']}" if entry.get("batch") else ""
    others = sorted((t, r) for r, t in timings.items() if r != "float32" and isinstance(t, (int, float)))
    rejected = entry.get("rejected") if isinstance(entry.get("rejected"), dict) else {}
    if route != "float32":
        vs = f"vs {_ms(timings, 'float32')}" if "float32" in timings else \
            f"(float32 left out: {rejected.get('float32', 'not timed')})"
        result = f"{_ms(timings, route)} {vs} per solve"
    elif others:
        result = f"{_ms(timings, 'float32')} kept (fastest other: {_ms(timings, others[0][1])}) per solve"
    else:
        result = "float32 kept"
    return f"measured by --preflight on {str(entry.get('date', '?'))[:10]}" + (f" ({where})" if where else "") \
        + f": {result}"


def decide(device, requested: str = "auto", records=None) -> Route:
    """The route for every run of a command on `device` (see the module's docstring). Raises RouteError
    when `requested` names a route that cannot run here."""
    device = torch.device(device)
    if requested not in SOLVERS:
        raise RouteError(f"unknown SES solver {requested!r}; use one of {', '.join(SOLVERS)}")
    if requested != "auto":
        why = unavailable(requested, device)
        if why:
            raise RouteError(f"SES solver {requested} cannot run on {gpu.name(device)}: {why}; leave "
                             f"--ses-solver out (auto) or name another route")
        return Route(requested, "named by --ses-solver")
    if device.type != "cuda":
        return Route("float32", ON_CPU)
    entry = recorded(records, device)
    if entry is None:
        return Route("float32", DEFAULT)
    shape = entry.get("shape")
    shape = tuple(shape) if isinstance(shape, list) and len(shape) == 2 else None
    why = unavailable(entry["route"], device, shape)
    if why:
        return Route("float32", f"torch.linalg.eigvalsh: {entry['route']}, {summary(entry)}, cannot run here ({why})")
    return Route(entry["route"], summary(entry), shape)


def measure(grams, records, of_spectrum, **context) -> str:
    """--preflight: compare the routes on `grams` (the real Grams of one SES step; `of_spectrum` checked
    and differentiated, SES's H), choose by the 90 % rule, record it for this machine in the file
    `records` (atomically); returns the describe_choice line."""
    device = grams[0].device
    timings, rejected = compare_routes(grams, of_spectrum)
    route, margin = choose_route(timings)
    table = read_json(records)
    table = table if isinstance(table, dict) else {}
    table[machine_key(device)] = dict(
        gpu=gpu.name(device), torch=torch.__version__, cuda=torch.version.cuda, route=route,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        sizes=[g.shape[-1] for g in grams], shape=list(padded_shape(grams)), timings_s=timings, rejected=rejected,
        margin=margin, **context)
    Path(records).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(records), table)
    return describe_choice(route, timings, rejected, margin)
