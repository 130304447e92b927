"""Which SES solver route a process trains with: decided once before any run (ses_solvers.decision,
harness.solver_route), from a route the user names or what --preflight recorded for this GPU; never
timed and never checked by a child process inside a training run; the same for every run of a sweep
and recorded in each run's result.json; kept in the checkpoint, with a change on resume recorded; agreed
by torchrun ranks. A device of type cuda is given where the CUDA branch is meant (nothing runs on it)."""
import json
import os
import subprocess
import types
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from data_utils import Data, synthetic_dataset
from harness import checkpoints, cli, multigpu, preflight, runs, solver_route, sweep
from harness.config import DEFAULTS
from harness.registry import make_registry
from helpers import EXP10
from plumbing import gpu
from ses_solvers import cusolver_batched, decision, routes
from ses_solvers.decision import Route, RouteError, decide
from ses_core import entropy_of_spectrum

CUDA = torch.device("cuda", 0)
SETUP = dict(dataset="cifar10", layers="last3", smoke=dict(epochs=1, batch_size=4, n_train=8, n_test=4, image_size=8))
GRID = {"baseline": dict(ses=False), "ses_k1": dict(ses=True, every=1), "ses_k2": dict(ses=True, every=2)}


@pytest.fixture
def l40s(monkeypatch):
    """gpu.name says 'NVIDIA L40S' for any device; the batched routes' probe answers `why[0]` ('' = can run)."""
    why, asked = [""], []
    monkeypatch.setattr(gpu, "name", lambda device: "NVIDIA L40S")
    monkeypatch.setattr(cusolver_batched, "available", lambda device, shape=None: asked.append(shape) or why[0])
    return why, asked


def _timed(monkeypatch, timings):
    """compare_routes answers these timings (seconds) and no rejection."""
    monkeypatch.setattr(decision, "compare_routes", lambda grams, of_spectrum: (dict(timings), {}))


def _grams(sizes=(8, 16, 16)):
    return [torch.eye(k) for k in sizes]


def test_auto_is_float32_on_a_cpu_and_a_named_route_is_checked_where_it_would_run():
    assert decide("cpu")[:2] == ("float32", decision.ON_CPU)
    assert decide("cpu", "float64")[:2] == ("float64", "named by --ses-solver")
    with pytest.raises(RouteError, match="SES solver batched32 cannot run on .*: not a CUDA device"):
        decide("cpu", "batched32")


def test_auto_on_cuda_takes_the_preflights_record_for_this_gpu_and_versions_else_float32(tmp_path, monkeypatch, l40s):
    why, asked = l40s
    records = tmp_path / decision.RECORDS
    assert decide(CUDA, "auto", records)[:2] == ("float32", decision.DEFAULT)  # no record yet
    _timed(monkeypatch, {"float32": 0.030, "batched32": 0.012, "padded": 0.020})
    decision.measure(_grams(), records, entropy_of_spectrum, experiment="exp11", config="ses_k1", batch=256)
    monkeypatch.setattr(routes, "time_route", lambda *a, **k: pytest.fail("decide timed a route"))
    route, source, shape = decide(CUDA, "auto", records)
    assert route == "batched32" and asked[-1] == shape == (3, 16)  # checked at the recorded stack's shape
    assert source.startswith("measured by --preflight on 20") and "batched32 12.0 ms vs float32 30.0 ms" in source
    assert decide(CUDA, "auto", records) == (route, source, shape)  # the same inputs, the same route: every run alike
    why[0] = "selftest exited 1: boom"
    route, source, _ = decide(CUDA, "auto", records)
    assert route == "float32" and "batched32" in source and "boom" in source
    with pytest.raises(RouteError, match="boom"):
        decide(CUDA, "batched32", records)  # a named route that cannot run: refused, never replaced
    monkeypatch.setattr(torch, "__version__", "9.9.9")  # another torch: the record is not this machine's
    assert decide(CUDA, "auto", records)[:2] == ("float32", decision.DEFAULT)


def test_a_record_that_keeps_float32_or_cannot_be_read_gives_float32(tmp_path, monkeypatch, l40s):
    records = tmp_path / decision.RECORDS
    _timed(monkeypatch, {"float32": 0.010, "padded": 0.0095})  # 5 % faster: not enough to leave float32
    decision.measure(_grams(), records, entropy_of_spectrum)
    route, source, _ = decide(CUDA, "auto", records)
    assert route == "float32" and source.startswith("measured by --preflight") and "kept" in source
    records.write_text('{"NVIDIA L40S | torch')  # a copy cut short
    assert decide(CUDA, "auto", records)[:2] == ("float32", decision.DEFAULT)


def test_the_record_is_written_to_a_temp_file_that_replaces_the_old_one_and_keeps_other_machines(tmp_path, monkeypatch,
                                                                                                  l40s):
    records = tmp_path / "out" / decision.RECORDS
    records.parent.mkdir()
    records.write_text(json.dumps({"Tesla T4 | torch 2.14.1 | CUDA 12.8": {"route": "padded"}}))
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == records:  # at that moment the old file is whole and the new one complete beside it
            seen.append((json.loads(Path(dst).read_text()), json.loads(Path(src).read_text())))
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    _timed(monkeypatch, {"float32": 0.030, "batched32": 0.012})
    line = decision.measure(_grams(), records, entropy_of_spectrum, config="ses_k1")
    (old, new), = seen
    assert set(old) == {"Tesla T4 | torch 2.14.1 | CUDA 12.8"} and json.loads(records.read_text()) == new
    entry = new[decision.machine_key(CUDA)]
    assert new["Tesla T4 | torch 2.14.1 | CUDA 12.8"] == {"route": "padded"} and entry["route"] == "batched32"
    assert entry["sizes"] == [8, 16, 16] and entry["shape"] == [3, 16] and entry["config"] == "ses_k1"
    assert entry["timings_s"] == {"float32": 0.030, "batched32": 0.012} and line.startswith("batched32 (")
    assert sorted(p.name for p in records.parent.iterdir()) == [decision.RECORDS]  # no temp file left


def _guarded(real, monkeypatch, log):
    """real(...) run with every way of starting a process and of timing or probing a route made to fail."""
    def fail(what):
        def refuse(*a, **k):
            log.append(what)
            raise AssertionError(f"a training run called {what}")
        return refuse

    def call(*args, **kwargs):
        with monkeypatch.context() as m:
            for obj, name in ((subprocess, "Popen"), (os, "fork"), (os, "posix_spawn"), (routes, "time_route"),
                              (routes, "compare_routes"), (cusolver_batched, "available"),
                              (cusolver_batched, "selftest"), (decision, "decide"), (runs, "decide")):
                m.setattr(obj, name, fail(f"{obj.__name__}.{name}"))
            return real(*args, **kwargs)
    return call


def test_a_sweep_decides_once_and_its_runs_start_no_process_and_time_no_route(tmp_path, monkeypatch, capsys,
                                                                             cpu_cusolver):
    """batched32 (decided before the sweep, as from a preflight record) runs through the emulated cuSOLVER
    call: building and training each run touches no process, timing or probe, and every SES run records it."""
    decided = Route("batched32", "measured by --preflight on 2026-12-07: batched32 12.0 ms vs float32 30.0 ms")
    calls, log = [], []
    monkeypatch.setattr(solver_route, "decide", lambda *a: calls.append(a) or decided)
    monkeypatch.setattr(sweep, "build_run", _guarded(sweep.build_run, monkeypatch, log))
    monkeypatch.setattr(sweep, "train_run", _guarded(sweep.train_run, monkeypatch, log))
    code = cli.run_experiment(EXP10, SETUP, GRID, "doc", ["--smoke", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and log == [] and len(calls) == 1 and out.count("SES solver route: batched32 (measured") == 1
    assert cpu_cusolver  # the route was used, through the batched call
    results = {p.parent.name: json.loads(p.read_text()) for p in tmp_path.rglob("result.json")}
    assert set(results) == {"baseline_seed0", "ses_k1_seed0", "ses_k2_seed0"}
    for name in ("ses_k1_seed0", "ses_k2_seed0"):
        r = results[name]
        assert (r["ses_solver"], r["ses_solver_source"], r["ses_solver_changes"]) == (decided.name, decided.source, [])
        assert not {"ses_solver_timings_s", "ses_solver_rejected", "ses_solver_margin", "ses_solver_ranks"} & set(r)
    assert results["baseline_seed0"]["ses_solver"] is None and results["baseline_seed0"]["ses_solver_source"] is None


def test_a_named_route_that_cannot_run_here_is_one_line_before_any_run(tmp_path, capsys):
    code = cli.run_experiment(EXP10, SETUP, GRID, "doc", ["--smoke", "--ses-solver", "batched32", "--out-dir",
                                                         str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: SES solver batched32 cannot run on") and "not a CUDA device" in err
    assert not list(tmp_path.rglob("*_seed0"))  # no run was started


def test_the_preflight_measures_the_first_ses_config_records_it_and_times_steps_with_the_decided_route(
        tmp_path, monkeypatch, capsys, l40s, cpu_cusolver):
    """The CUDA branch of --preflight on CPU tensors (host-clock timing): the routes compared once, on the
    first SES config's real Gram matrices; the record read back by decide; every SES config timed with it."""
    monkeypatch.setattr(solver_route, "measured_on", lambda device: True)
    monkeypatch.setattr(solver_route, "decide", lambda device, requested, records: decide(CUDA, requested, records))
    compared, built = [], []
    real_compare, real_build = decision.compare_routes, preflight.build_run

    def compare(grams, of_spectrum):
        compared.append([tuple(g.shape) for g in grams])
        timings, rejected = real_compare(grams, of_spectrum, reps=1, rounds=1)
        return dict(timings, float64=min(timings.values()) / 2), rejected  # float64 the clear winner
    monkeypatch.setattr(decision, "compare_routes", compare)

    def build(*args, **kwargs):
        run = real_build(*args, **kwargs)
        built.append(run.ses.solver if run.ses is not None else None)
        return run
    monkeypatch.setattr(preflight, "build_run", build)
    code = cli.run_experiment(EXP10, SETUP, GRID, "doc", ["--smoke", "--preflight", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    (shapes,) = compared  # once, for ses_k1 alone
    record = tmp_path / Path(EXP10).stem / decision.RECORDS  # the experiment's own record
    entry = json.loads(record.read_text())[decision.machine_key(CUDA)]
    assert entry["route"] == "float64" and entry["config"] == "ses_k1" and entry["batch"] == 4
    assert entry["shape"] == [len(shapes), max(s[-1] for s in shapes)]
    assert out.count("ses_k1: SES solver routes on its real Gram matrices: float64 (") == 1
    assert "SES solver route: float64 (measured by --preflight on" in out
    assert [solver for solver in built if solver] == ["float64", "float64"]  # ses_k1, ses_k2
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [record]  # no run folder


def _tiny(route: Route):
    tx, ty, vx, vy, _ = synthetic_dataset(10, 8, 8, 4)
    data = Data(tx, ty, vx, vy, dict(num_classes=10, image_size=8, pad=1, mean=(0.5,) * 3, std=(0.25,) * 3))
    cfg = dict(DEFAULTS, dataset="cifar10", layers="last3", ses=True, batch_size=4, seed=3, epochs=3,
               experiment="e", config="c")
    return runs.build_run(cfg, data, torch.device("cpu"), make_registry(), route=route)


def test_the_checkpoint_keeps_the_route_and_a_resume_onto_another_records_the_change(tmp_path):
    """Also read: the route of a checkpoint that held it with the timings that chose it, and none."""
    first = _tiny(Route("float64", "named by --ses-solver"))
    checkpoints.save_checkpoint(first, tmp_path / "checkpoint.pt", 2, [dict(epoch=1), dict(epoch=2)])
    first.close()
    resumed = _tiny(Route("float32", decision.DEFAULT))
    assert checkpoints.resume(resumed, tmp_path)[1] == 2
    assert resumed.ses.solver == "float32"  # the sweep's route, not the checkpoint's
    assert resumed.ses.solver_changes == [f"epoch 2: float64 -> float32 (this sweep's route: {decision.DEFAULT})"]
    checkpoints.save_checkpoint(resumed, tmp_path / "checkpoint.pt", 3, [dict(epoch=e) for e in (1, 2, 3)])
    again = _tiny(Route("float32", decision.DEFAULT))
    checkpoints.resume(again, tmp_path)  # the same route: nothing new, the earlier change kept
    assert again.ses.solver_changes == resumed.ses.solver_changes
    older = {"step": 6, "applied_steps": 6, "solver": {"route": "batched32", "timings": {}, "changes": ["step 3: x"]}}
    assert again.ses.load_state_dict(older) == "batched32" and again.ses.solver_changes == ["step 3: x"]
    assert again.ses.load_state_dict({"step": 3, "applied_steps": 3}) is None  # a checkpoint naming no route
    for r in (resumed, again):
        r.close()


def _rank(rank: int, store: str, out: str):
    multigpu.join("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    got = {}
    try:
        def decide_on_rank_0(device, requested, records):
            assert multigpu.current().main, "a rank other than 0 decided"
            return decide(device, requested, records) if requested != "auto" else \
                Route("batched32", "measured by --preflight on 2026-12-07", (9, 256))
        solver_route.decide = decide_on_rank_0
        shapes = got.setdefault("shapes", [])

        def available(device, shape=None):
            shapes.append(shape)
            return "" if rank == 0 else "selftest exited 1: boom"
        cusolver_batched.available = available
        args = types.SimpleNamespace(out_dir=out, ses_solver="auto")
        got["auto"] = tuple(solver_route.settle(args, torch.device("cpu"), "exp10_periodic_ses"))
        args.ses_solver = "batched32"
        try:
            solver_route.settle(args, torch.device("cpu"), "exp10_periodic_ses")
        except RouteError as e:
            got["named"] = (str(e), getattr(e, "agreed", False))
    finally:
        multigpu.finish()
    Path(out, f"rank{rank}.json").write_text(json.dumps(got))


def test_torchrun_ranks_take_rank_0s_route_or_all_float32_when_one_rank_cannot_run_it(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got[0]["shapes"] == [None] and got[1]["shapes"][0] == [9, 256]  # rank 1 checks the recorded shape
    got[0].pop("shapes"), got[1].pop("shapes")
    assert got[0] == got[1]  # one route, one source, on every rank
    route, source, _ = got[0]["auto"]
    assert route == "float32" and "batched32" in source and "rank 1: selftest exited 1: boom" in source
    message, agreed = got[0]["named"]
    assert agreed and "rank 1: selftest exited 1: boom" in message  # a named route: every rank stops
