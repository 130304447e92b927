"""The exact solver routes of ses_solvers (padding, the one-call routes) and their comparison: the check
against float64 LAPACK, the timing of the solve (back-to-back reps between two events, checked with
stand-in events), the 90 % rule and its one-line description, and that a route's fault never escapes.
The cuSOLVER call is emulated by its contract (the `cpu_cusolver` fixture of conftest); the `test_cuda_*`
tests need a GPU (bench/gpu_check.sh runs them). Which route a process trains with: test_solver_route.py."""
import pytest
import torch

from ses_solvers import cusolver_batched
from ses_solvers import routes as ses_solvers
from ses_core import _centred_gram, entropy_of_spectrum, spectral_entropies
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
        timings, rejected = ses_solvers.compare_routes(grams, entropy_of_spectrum, ses_solvers.ROUTES, reps=1, rounds=2)
    assert set(timings) == {"float64", "host", "padded", "batched32"} and all(t > 0 for t in timings.values())
    assert rejected["float32"].startswith("H differs from float64 LAPACK by")
    assert rejected["batched64"] == "CusolverError: cusolverDnXsyevBatched returned cusolverStatus 7"


def test_unavailable_batched_routes_are_left_out_with_the_reason(monkeypatch):
    grams = [_centred_gram(torch.randn(32, 8))]
    asked = []
    monkeypatch.setattr(cusolver_batched, "available", lambda device, shape=None: asked.append(shape) or "selftest exited 1: boom")
    timings, rejected = ses_solvers.compare_routes(grams, entropy_of_spectrum, ["float64", "batched32"], reps=1,
                                                   rounds=1)
    assert set(timings) == {"float64"} and rejected == {"batched32": "selftest exited 1: boom"}
    assert asked == [(1, 8)]  # the probe is asked about the real padded stack (B, k)


@pytest.mark.parametrize("timings,route,margin", [
    ({"float32": 10.0, "padded": 9.5, "batched32": 9.2}, "float32", 0.08),   # the best saves 8 %: float32 kept
    ({"float32": 10.0, "padded": 9.0}, "padded", 0.10),                      # exactly 10 %: enough
    ({"float32": 10.0, "padded": 5.0, "batched32": 2.5}, "batched32", 0.75),
    ({"float32": 10.0, "padded": 12.0}, "float32", -0.2),
    ({"float32": 10.0}, "float32", None),
    ({"padded": 3.0, "host": 2.0}, "host", None),                             # float32 left out: the fastest
    ({}, "host", None),                                                      # nothing timed: the exact reference
])
def test_the_rule_keeps_float32_unless_another_route_is_at_least_10_percent_faster(timings, route, margin):
    got, m = ses_solvers.choose_route(timings)
    assert got == route and (m is None if margin is None else m == pytest.approx(margin))


def test_the_rule_breaks_ties_by_name_and_its_line_says_what_was_timed_and_left_out():
    assert ses_solvers.choose_route({"float32": 1.0, "padded": 0.5, "host": 0.5}) == ("host", 0.5)  # ties: by name
    line = ses_solvers.describe_choice("padded", {"float32": 0.004, "padded": 0.001}, {"batched32": "selftest exited 1"}, 0.75)
    assert line.startswith("padded (float32 4.0 ms, padded 1.0 ms; fastest other route takes 25 % of float32's time")
    assert line.endswith("; batched32 left out: selftest exited 1)")
    line = ses_solvers.describe_choice("host", {}, {"float32": "failed"}, None)
    assert line == "host (no route could be timed: host, exact wherever it runs; float32 left out: failed)"


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
    log, real, names = [], ses_solvers.eigenvalues, iter(["start", "end"] * 2)

    def eigenvalues(grams, solver):
        log.append("forward")
        lam = real(grams, solver)
        lam.register_hook(lambda g: log.append("backward"))
        return lam
    monkeypatch.setattr(ses_solvers, "eigenvalues", eigenvalues)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: log.append("sync"))
    grams = [_centred_gram(torch.randn(16, d)) for d in (4, 8)]
    seconds, hs = ses_solvers.time_route(grams, "float64", entropy_of_spectrum, reps=4,
                                         event=lambda: FakeEvent(log, next(names)))
    assert log == ["forward", "backward", "new start", "new end", "record start"] + ["forward", "backward"] * 4 \
        + ["record end", "wait end", "elapsed"]  # a warm-up rep, then no sync between the two records
    assert seconds == pytest.approx(0.040 / 4) and len(hs) == 2 and not hs[0].requires_grad
    log.clear()
    ses_solvers.time_route(grams, "float64", entropy_of_spectrum, reps=1, event=lambda: FakeEvent(log, next(names)),
                           warmup=False)
    assert log[:3] == ["new start", "new end", "record start"]
    with pytest.raises(ValueError, match="reps"):
        ses_solvers.time_route(grams, "float64", entropy_of_spectrum, reps=0)


def test_compare_routes_times_every_route_and_never_raises_when_the_batched_probe_fails(monkeypatch, cpu_cusolver):
    """The preflight's comparison on the CPU (host-clock events): available() raising is a reason, not an error."""
    def broken(device, shape=None):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(cusolver_batched, "available", broken)
    grams = [_centred_gram(torch.randn(32, d)) for d in (8, 16, 16)]
    with torch.no_grad():
        timings, rejected = ses_solvers.compare_routes(grams, entropy_of_spectrum, reps=1, rounds=1)
    assert set(timings) == {"float32", "float64", "host", "padded"} and all(t > 0 for t in timings.values())
    assert rejected == {r: "RuntimeError: CUDA error: an illegal memory access was encountered"
                        for r in ("batched32", "batched64")}
    route, margin = ses_solvers.choose_route(timings)
    t32, best = timings["float32"], min(t for r, t in timings.items() if r != "float32")
    assert margin == pytest.approx(1 - best / t32) and (route == "float32") == (best > 0.9 * t32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_every_route_agrees_with_lapack_and_the_rule_chooses_among_them():
    grams = [_centred_gram(torch.randn(256, d, device="cuda")) for d in R18_DIMS]  # padded stack (8, 256)
    with torch.no_grad():
        timings, rejected = ses_solvers.compare_routes(grams, entropy_of_spectrum)
    route, _ = ses_solvers.choose_route(timings)
    assert "float32" in timings and set(timings) | set(rejected) == set(ses_solvers.ROUTES)
    assert route == "float32" or timings[route] <= 0.9 * timings["float32"]
    hs = {r: ses_solvers.forward_backward(grams, r, entropy_of_spectrum).cpu() for r in timings}
    for r, h in hs.items():
        assert torch.allclose(h, hs["host"], atol=1e-3), r
