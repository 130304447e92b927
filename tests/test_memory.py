"""harness.memory: the estimate of a run's GPU memory, made on the CPU, and the line saying what fits.

The byte counts are checked against hand counts on a small network whose saved tensors are known
(ReLU keeps its output; a Linear keeps its input; SGD with momentum keeps one buffer a parameter),
and the advice of the fit line against the estimate's own arithmetic (what it offers fits)."""
import pytest
import torch
import torch.nn as nn

from harness.config import DEFAULTS
from harness.memory import FIT, GiB, Estimate, estimate, fit_line
from harness.registry import make_registry


def mlp(hidden):
    return lambda cfg, info: nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 5))


def features(n_train, n_test):  # float "points": the loader passes them through unchanged
    return torch.rand(n_train, 8), torch.zeros(n_train, dtype=torch.long), torch.rand(n_test, 8), None, None


INFO = dict(num_classes=5, synthetic=features)


def run_estimate(hidden, half, batch=32, optimizer="sgd", processes=1, **settings):
    reg = make_registry(models={"mlp": mlp(hidden)})
    cfg = dict(DEFAULTS, model="mlp", layers="", batch_size=batch, optimizer=optimizer, config="c", ses=False,
               **settings)
    return estimate(cfg, INFO, reg, half, sizes=(100, 20), processes=processes)


@pytest.mark.parametrize("half, size", [(False, 4), (True, 2)])
def test_the_activations_per_sample_grow_by_the_relu_output_in_the_run_precision(half, size):
    """Widening the hidden layer by 32 adds one saved tensor of 32 values a sample (ReLU's output, which
    the second Linear saves too: one storage, counted once), 4 bytes each in float32, 2 under autocast."""
    narrow, wide = run_estimate(16, half), run_estimate(48, half)
    assert wide.per_sample - narrow.per_sample == 32 * size
    assert narrow.peak(64) - narrow.peak(32) == 32 * narrow.per_sample  # linear in the batch


def test_state_counts_parameters_gradients_and_the_optimizer_buffers():
    n = sum(p.numel() for p in mlp(16)(None, None).parameters())
    assert run_estimate(16, False).state == n * 4 * 3  # weights, gradients, SGD momentum (float32)
    assert run_estimate(16, False, optimizer="adamw").state == n * 4 * 4 + 4 * 4  # two moments; a step count each
    assert run_estimate(16, False).data == (100 + 20) * 8 * 4  # every sample of both splits, float32
    assert run_estimate(16, False, val_size=10).data == (2 * 100 + 20) * 8 * 4  # the split copies the training set
    two = run_estimate(16, False, batch=32, processes=2)
    assert two.state == n * 4 * 4 and two.batch == 16  # DDP's gradient buckets; half the batch per process


def test_the_estimate_leaves_the_global_random_streams_alone(monkeypatch):
    """The CPU's stream is as it was, and no GPU's is reseeded (torch.manual_seed would queue that)."""
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    run_estimate(16, False)
    assert torch.equal(torch.rand(3), expected) and reseeded == []


def r50_like(batch=256):
    """An estimate shaped like exp11's (1.3 GB of data, 0.3 GB of state, 51 MB a sample), made by hand."""
    return Estimate(data=1_351_680_000, state=287_000_000, fixed=48_000_000, per_sample=51_000_000, batch=batch,
                    dims=(2048,) * 4)


def test_the_fit_line_offers_only_what_fits_by_the_same_arithmetic():
    t4, l40s = 15_102 * 2 ** 20, 46_068 * 2 ** 20
    cfg = dict(DEFAULTS, config="ses_k1", batch_size=256, ses=True)
    est = r50_like()
    assert fit_line(est, l40s, "L40S", cfg, "bf16", "exp11.py") == ""
    line = fit_line(est, t4, "Tesla T4", cfg, "fp16", "exp11.py")
    assert est.peak() > FIT * t4 and "does not fit" in line and "\n" not in line
    assert "torchrun --standalone --nproc_per_node 2 exp11.py" in line and est.peak(128) <= FIT * t4
    b = est.largest_batch(t4)
    assert f"--batch-size {b} " in line and est.peak(b) <= FIT * t4 < est.peak(2 * b) and b & (b - 1) == 0
    assert "log 127" in line  # 0.7 log 2048 = 5.34 > log 127 = 4.84: SES's target is then out of reach


def test_nothing_fits_says_so_and_a_torchrun_share_is_estimated_per_process():
    cfg = dict(DEFAULTS, config="baseline", batch_size=256, ses=False)
    small = 3 * GiB  # data and state take most of it: a batch of 16 would fit, too small to offer
    line = fit_line(r50_like(), small, "small card", cfg, "fp16", "exp11.py")
    assert r50_like().largest_batch(small) == 16 and line.endswith("Nor does any batch of 32 or more on one such GPU.")
    shared = fit_line(r50_like(batch=128), 8 * GiB, "card", cfg, "fp16", "exp11.py", processes=2)
    assert "(128 on each of 2 processes)" in shared and "--nproc_per_node 4" in shared


def test_one_estimate_per_model_batch_and_precision_seeds_and_ses_settings_share_it(monkeypatch):
    """The estimate's key is every setting a model, its input, the batch or the optimizer reads: runs that
    differ in seed or SES settings share one estimate, another batch size gets its own."""
    from fake_cuda import PretendGPUs
    from harness import memory
    PretendGPUs("l40s").install(monkeypatch.setattr)
    made = []
    monkeypatch.setattr(memory, "_ESTIMATES", {})
    monkeypatch.setattr(memory, "estimate", lambda cfg, *a: made.append(cfg["variant"]) or
                        Estimate(data=0, state=0, fixed=0, per_sample=1, batch=cfg["batch_size"]))
    base = dict(DEFAULTS, experiment="exp", config="c", seed=0, ses=False, variant="baseline")
    cfgs = [base, dict(base, seed=1), dict(base, ses=True, lam=0.05, every=3, ses_target="rank", variant="ses"),
            dict(base, batch_size=64, variant="small"), dict(base, model="resnet50", variant="r50")]
    estimates, lines = memory.fit_warnings(cfgs, "exp.py", make_registry(), torch.device("cuda:0"),
                                           lambda cfg: (10, 10))
    assert made == ["baseline", "small", "r50"] and lines == []
    assert estimates["ses"] is estimates["baseline"] and estimates["small"] is not estimates["baseline"]
