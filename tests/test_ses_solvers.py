"""The exact solver routes of ses_solvers (padding, the one-call routes) and auto: the check against
float64 LAPACK, the timing of the solve (back-to-back reps between two events, checked with stand-in
events), the 90 % rule, the rule shared by torchrun ranks and what it records, that a route's fault never
escapes, and SES's route: an explicit one checked before use, auto's kept on resume where it can run.
The cuSOLVER call is emulated by its contract (the `cpu_cusolver` fixture of conftest); the `test_cuda_*`
tests need a GPU (bench/gpu_check.sh runs them)."""
import pytest
import torch

from ses_solvers import cusolver_batched
from ses_solvers import routes as ses_solvers
import ses_core
from ses_core import _centred_gram, spectral_entropies
from test_ses_core import random_acts, reference_entropy

R18_DIMS = [64, 64, 128, 128, 256, 256, 512, 512]  # ResNet-18 `all` at n = 256, avgpool = layer4.1


def test_padded_routes_solve_every_layer_in_one_call(monkeypatch, cpu_cusolver):
    acts = [torch.randn(256, d) for d in R18_DIMS]
    calls = []
    real = torch.linalg.eigvalsh
    monkeypatch.setattr(torch.linalg, "eigvalsh", lambda g: calls.append(tuple(g.shape)) or real(g))
    per_size = spectral_entropies(acts, "float64")
    assert calls == [(2, 64, 64), (2, 128, 128), (4, 256, 256)]
    calls.clear()
    padded = spectral_entropies(acts, "padded")
    assert calls == [(8, 256, 256)]
    batched = spectral_entropies(acts, "batched32")
    assert cpu_cusolver == [(8, 256, 256)]
    for a, b, c in zip(per_size, padded, batched):
        assert a.item() == pytest.approx(b.item(), abs=1e-5) and a.item() == pytest.approx(c.item(), abs=1e-4)


@pytest.mark.parametrize("solver", ["padded", "batched32", "batched64"])
def test_padding_is_exact_for_rank_deficient_layers_in_value_and_gradient(solver, cpu_cusolver):
    """Dead features (zero columns) give the small matrices zero eigenvalues of their own besides the
    padding's; H and the gradient w.r.t. the activations still equal the unpadded float64 route."""
    arrays = [random_acts(64, 16, 1.0, seed=1), random_acts(64, 48, 1.0, seed=2), random_acts(64, 128, 1.0, seed=3)]
    arrays[0][:, :5] = 0.0
    arrays[1][:, 10:30] = 0.0
    acts = [torch.from_numpy(a).requires_grad_(True) for a in arrays]
    hs = spectral_entropies(acts, solver)
    for h, a in zip(hs, arrays):
        assert h.item() == pytest.approx(reference_entropy(a), abs=2e-4)
    (torch.stack(hs) ** 2).sum().backward()
    ref = [torch.from_numpy(a).double().requires_grad_(True) for a in arrays]
    (torch.stack(spectral_entropies(ref, "float64")) ** 2).sum().backward()
    for a, b in zip(acts, ref):
        assert torch.isfinite(a.grad).all()
        assert torch.allclose(a.grad.double(), b.grad, atol=1e-4, rtol=1e-3)


def test_a_failed_batched_solve_gives_nan_for_that_layer_only(monkeypatch):
    def eigh_batched(a, dtype=None):
        w, v = torch.linalg.eigh(a.to(dtype))
        return w, v, torch.tensor([0, 3, 0], dtype=torch.int32)  # matrix 1 did not converge
    monkeypatch.setattr(cusolver_batched, "eigh_batched", eigh_batched)
    hs = spectral_entropies([torch.randn(32, d) for d in (8, 16, 24)], "batched64")
    assert torch.isfinite(hs[0]) and torch.isnan(hs[1]) and torch.isfinite(hs[2])


def test_compare_routes_keeps_agreeing_routes_and_says_why_it_left_the_others_out(monkeypatch, cpu_cusolver):
    grams = [_centred_gram(torch.randn(64, d)) for d in (16, 64, 128)]
    real = ses_solvers.eigvals_psd

    def eigvals_psd(gram, solver="float32"):
        lam = real(gram, solver)
        if solver == "float32":  # a wrong route: its largest eigenvalue doubled
            lam = torch.cat([lam[..., :-1], 2 * lam[..., -1:]], -1)
        if solver == "batched64":
            raise cusolver_batched.CusolverError("cusolverDnXsyevBatched returned cusolverStatus 7")
        return lam
    monkeypatch.setattr(ses_solvers, "eigvals_psd", eigvals_psd)
    monkeypatch.setattr(cusolver_batched, "available", lambda device, shape=None: "")
    with torch.no_grad():  # as SES calls it
        timings, rejected = ses_solvers.compare_routes(grams, ses_solvers.SOLVERS[1:], reps=1, rounds=2)
    assert set(timings) == {"float64", "host", "padded", "batched32"} and all(t > 0 for t in timings.values())
    assert rejected["float32"].startswith("H differs from float64 LAPACK by")
    assert rejected["batched64"] == "CusolverError: cusolverDnXsyevBatched returned cusolverStatus 7"


def test_unavailable_batched_routes_are_left_out_with_the_reason(monkeypatch):
    grams = [_centred_gram(torch.randn(32, 8))]
    asked = []
    monkeypatch.setattr(cusolver_batched, "available", lambda device, shape=None: asked.append(shape) or "selftest exited 1: boom")
    timings, rejected = ses_solvers.compare_routes(grams, ["float64", "batched32"], reps=1, rounds=1)
    assert set(timings) == {"float64"} and rejected == {"batched32": "selftest exited 1: boom"}
    assert asked == [(1, 8)]  # the probe is asked about the real padded stack (B, k)


def test_ranks_agree_on_the_route_fastest_on_their_slowest_rank_and_record_those_times():
    per_rank = [({"float64": 1.0, "host": 2.0, "batched32": 0.1}, {"padded": "boom"}),
                ({"float64": 3.0, "host": 2.5}, {"batched32": "selftest exited 1: bad", "padded": "boom"})]
    choice = ses_solvers.common_route(per_rank)  # batched32 is missing on rank 1; no float32 timed
    assert (choice.route, choice.margin, choice.ranks) == ("host", None, 2)
    assert choice.timings == {"float64": 3.0, "host": 2.5}  # the times the rule used: each route's slowest rank
    assert choice.rejected["batched32"] == "rank 1: selftest exited 1: bad"  # rank 0 timed it, rank 1 did not
    assert choice.rejected["padded"] == "ranks 0, 1: boom" and choice.rejected["float32"] == "ranks 0, 1: not timed"
    assert ses_solvers.common_route([({}, {}), ({}, {})]) is None and ses_solvers.common_route([]) is None


def test_ranks_that_share_no_route_take_host_and_say_why_each_rank_left_the_others_out():
    choice = ses_solvers.common_route([({"float32": 1.0}, {"float64": "off"}), ({"float64": 1.0}, {"float32": "failed"})])
    assert choice.route == "host" and choice.timings == {} and choice.rejected["float32"] == "rank 1: failed"
    assert choice.rejected["float64"] == "rank 0: off"
    line = ses_solvers.describe_choice(*choice)
    assert line.startswith("host (no route could be timed on every rank: host, exact wherever it runs; ")
    assert "float32 left out: rank 1: failed" in line


def test_ses_takes_the_agreed_route_under_several_processes(monkeypatch):
    monkeypatch.setattr(ses_core, "pick_solver", lambda grams: ses_solvers.Choice("float64", {"float64": 1.0, "host": 2.0}, {}, None))
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    ses = ses_core.SES(model, ["0", "2"], lam=0.1, beta=0.5)
    seen = []
    ses.agree = lambda mine: seen.append(mine) or [mine, ({"float64": 3.0, "host": 2.5}, {"padded": "off"})]
    ses.begin_step()
    model(torch.randn(32, 8))
    ses.penalty().backward()
    assert ses.solver == "host" and seen == [({"float64": 1.0, "host": 2.0}, {})] and ses.solver_margin is None
    assert ses.solver_timings == {"float64": 3.0, "host": 2.5} and ses.solver_ranks == 2  # what the rule used
    assert ses.solver_rejected["padded"] == "rank 0: not timed; rank 1: off"


@pytest.mark.parametrize("timings,route,margin", [
    ({"float32": 10.0, "padded": 9.5, "batched32": 9.2}, "float32", 0.08),   # the best saves 8 %: float32 kept
    ({"float32": 10.0, "padded": 9.0}, "padded", 0.10),                      # exactly 10 %: enough
    ({"float32": 10.0, "padded": 5.0, "batched32": 2.5}, "batched32", 0.75),
    ({"float32": 10.0, "padded": 12.0}, "float32", -0.2),
    ({"float32": 10.0}, "float32", None),
    ({"padded": 3.0, "host": 2.0}, "host", None),                             # float32 left out: the fastest
    ({}, "host", None),                                                      # nothing timed: the exact reference
])
def test_auto_keeps_float32_unless_another_route_is_at_least_10_percent_faster(timings, route, margin):
    got, m = ses_solvers.choose_route(timings)
    assert got == route and (m is None if margin is None else m == pytest.approx(margin))


def test_the_common_route_is_the_rule_on_the_slowest_rank_and_the_same_whatever_the_order():
    fast, slow = ({"float32": 10.0, "padded": 6.0, "host": 30.0}, {}), ({"float32": 11.0, "padded": 10.5, "host": 12.0}, {})
    choice = ses_solvers.common_route([fast, slow])
    assert choice.route == "float32" and choice.margin == pytest.approx(1 - 10.5 / 11.0)  # 5 % on the slow one
    assert ses_solvers.common_route([slow, fast]) == choice
    slow[0]["padded"] = 9.0  # now 18 % faster on the slowest rank
    assert ses_solvers.common_route([fast, slow]).route == "padded"
    assert ses_solvers.choose_route({"float32": 1.0, "padded": 0.5, "host": 0.5}) == ("host", 0.5)  # ties: by name


class FakeEvent:
    """torch.cuda.Event's timing interface, logging what is done when; 40 ms from start to end."""

    def __init__(self, log, name):
        self.log, self.name = log, name
        log.append(f"new {name}")

    def record(self, stream=None):
        self.log.append(f"record {self.name}")

    def synchronize(self):
        self.log.append(f"wait {self.name}")

    def elapsed_time(self, end):
        self.log.append("elapsed")
        return 40.0


def test_time_route_times_back_to_back_reps_between_two_events_with_one_wait(monkeypatch):
    log, real, names = [], ses_solvers.entropies_of_grams, iter(["start", "end"] * 2)

    def entropies(grams, solver):
        log.append("forward")
        hs = real(grams, solver)
        hs[0].register_hook(lambda g: log.append("backward"))
        return hs
    monkeypatch.setattr(ses_solvers, "entropies_of_grams", entropies)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: log.append("sync"))
    grams = [_centred_gram(torch.randn(16, d)) for d in (4, 8)]
    seconds, hs = ses_solvers.time_route(grams, "float64", reps=4, event=lambda: FakeEvent(log, next(names)))
    assert log == ["forward", "backward", "new start", "new end", "record start"] + ["forward", "backward"] * 4 \
        + ["record end", "wait end", "elapsed"]  # a warm-up rep, then no sync between the two records
    assert seconds == pytest.approx(0.040 / 4) and len(hs) == 2 and not hs[0].requires_grad
    log.clear()
    ses_solvers.time_route(grams, "float64", reps=1, event=lambda: FakeEvent(log, next(names)), warmup=False)
    assert log[:3] == ["new start", "new end", "record start"]
    with pytest.raises(ValueError, match="reps"):
        ses_solvers.time_route(grams, "float64", reps=0)


def test_pick_solver_records_every_route_and_never_raises_when_the_batched_probe_fails(monkeypatch, cpu_cusolver):
    """The CUDA path of auto run on the CPU (host-clock events): available() raising is a reason, not an error."""
    def broken(device, shape=None):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(cusolver_batched, "available", broken)
    monkeypatch.setattr(ses_solvers, "timed_here", lambda device: True)
    grams = [_centred_gram(torch.randn(32, d)) for d in (8, 16, 16)]
    with torch.no_grad():
        choice = ses_solvers.pick_solver(grams, reps=1, rounds=1)
    assert set(choice.timings) == {"float32", "float64", "host", "padded"} and all(t > 0 for t in choice.timings.values())
    assert choice.rejected == {r: "RuntimeError: CUDA error: an illegal memory access was encountered"
                               for r in ("batched32", "batched64")}
    t32, best = choice.timings["float32"], min(t for r, t in choice.timings.items() if r != "float32")
    assert choice.margin == pytest.approx(1 - best / t32)
    assert (choice.route == "float32") == (best > 0.9 * t32)


# ----------------------------------------------------------------------------- SES's route: checked, kept on resume
def _one_ses_step(ses, model, x=None):
    ses.begin_step()
    model(torch.randn(32, 8) if x is None else x)
    return ses.penalty()


def test_an_explicit_route_that_cannot_run_here_is_refused_in_one_line_before_any_solve(monkeypatch):
    from ses_solvers import cusolver_batched
    monkeypatch.setattr(cusolver_batched, "eigh_batched", lambda *a, **k: pytest.fail("solved without the check"))
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    ses = ses_core.SES(model, ["0", "2"], lam=0.1, beta=0.5, solver="batched32")
    with pytest.raises(RuntimeError) as e:
        _one_ses_step(ses, model)
    assert str(e.value) == ("SES solver 'batched32' cannot run here: not a CUDA device; use solver='auto', "
                            "which picks a route that can")


def test_a_resumed_run_keeps_autos_route_and_its_measurement(monkeypatch):
    """state_dict -> load_state_dict round trip: the resumed SES solves by the saved route without timing
    anything again, and reports the saved timings (what chose it), not a new choice."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    measured = ses_solvers.Choice("padded", {"float32": 2.0, "padded": 1.0}, {"batched32": "selftest exited 1: x"}, 0.5)
    monkeypatch.setattr(ses_core, "pick_solver", lambda grams: measured)
    first = ses_core.SES(model, ["0", "2"], lam=0.1, beta=0.5)
    _one_ses_step(first, model)
    state = first.state_dict()
    monkeypatch.setattr(ses_core, "pick_solver", lambda grams: pytest.fail("auto timed the routes again"))
    resumed = ses_core.SES(model, ["0", "2"], lam=0.1, beta=0.5)
    resumed.load_state_dict(state)
    assert resumed.step == 1 and resumed.applied_steps == 1
    x, calls, real = torch.randn(32, 8), [], torch.linalg.eigvalsh
    monkeypatch.setattr(torch.linalg, "eigvalsh", lambda g: calls.append((tuple(g.shape), g.dtype)) or real(g))
    assert _one_ses_step(resumed, model, x).item() == pytest.approx(_one_ses_step(first, model, x).item(), rel=1e-5)
    assert calls == [((2, 16, 16), torch.float64)] * 2  # "padded": sizes 16 and 4 in one float64 call, both runs
    assert tuple(resumed.solver_choice()) == tuple(measured) and resumed.solver_changes == []
    assert resumed.state_dict()["solver"] == first.state_dict()["solver"]


def test_a_resumed_route_that_cannot_run_here_is_chosen_again_and_the_change_recorded():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    state = {"step": 6, "applied_steps": 6, "solver": dict(route="batched32", timings={"float32": 2.0, "batched32": 1.0},
                                                           rejected={}, margin=0.5, ranks=1, requested="auto", changes=[])}
    ses = ses_core.SES(model, ["0", "2"], lam=0.1, beta=0.5)
    ses.load_state_dict(state)
    assert torch.isfinite(_one_ses_step(ses, model))
    assert ses.solver == "float32" and ses.solver_timings == {} and ses.solver_margin is None  # auto on a CPU
    assert ses.solver_changes == ["step 6: batched32 (chosen before the resume) cannot run here (not a CUDA device); "
                                  "auto chose float32"]
    assert ses.state_dict()["solver"]["changes"] == ses.solver_changes  # carried into the next checkpoint
    explicit = ses_core.SES(model, ["0", "2"], lam=0.1, beta=0.5, solver="float64")
    explicit.load_state_dict(state)  # an explicit route is the user's: a saved auto choice does not replace it
    assert explicit.solver == "float64"
    old = ses_core.SES(model, ["0", "2"], lam=0.1, beta=0.5)
    old.load_state_dict({"step": 3, "applied_steps": 3})  # a checkpoint from before the route was saved
    assert old.solver == "auto" and old.step == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_every_route_agrees_with_lapack_and_auto_records_its_choice():
    grams = [_centred_gram(torch.randn(256, d, device="cuda")) for d in R18_DIMS]  # padded stack (8, 256)
    with torch.no_grad():
        choice = ses_solvers.pick_solver(grams)
    assert "float32" in choice.timings and set(choice.timings) | set(choice.rejected) == set(ses_solvers.SOLVERS[1:])
    assert choice.route == "float32" or choice.timings[choice.route] <= 0.9 * choice.timings["float32"]
    hs = {r: torch.stack(ses_solvers.forward_backward(grams, r)).cpu() for r in choice.timings}
    for r, h in hs.items():
        assert torch.allclose(h, hs["host"], atol=1e-3), r
