"""Perceiver model, Fourier features, permutation, weight sharing, LAMB, ModelNet40 readers."""
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from perceiver import modelnet40 as pc
from perceiver.lamb import Lamb
from perceiver.model import Perceiver, fourier_features, grid_coords, latent_taps

CIFAR = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def image_model(**kw):
    args = dict(num_classes=10, input_kind="image", num_tokens=64, image_size=8, num_latents=6, latent_dim=16,
                num_cross_attend_stages=3, num_transformer_blocks=2, num_heads=2, dropout=0.0, num_bands=4,
                max_freq=8.0, **CIFAR)
    args.update(kw)
    return Perceiver(**args)


def point_model(**kw):
    args = dict(num_classes=5, input_kind="points", num_tokens=32, num_latents=4, latent_dim=16,
                num_cross_attend_stages=2, num_transformer_blocks=1, num_heads=4, dropout=0.0, num_bands=3,
                max_freq=20.0)
    args.update(kw)
    return Perceiver(**args)


def test_shapes_taps_and_attention_maps():
    m = image_model().eval()
    x = torch.rand(5, 3, 8, 8)
    assert m(x).shape == (5, 10)
    logits, maps = m(x, return_attention=True)
    assert maps.shape == (5, 3, 6, 64)
    assert torch.allclose(maps.float().sum(-1), torch.ones(5, 3, 6), atol=1e-5)  # softmax rows
    assert torch.allclose(logits, m(x), atol=1e-5)  # the explicit-weights path equals the SDPA path
    assert latent_taps(m) == [f"taps.{i}" for i in range(6)]
    cls = image_model(pooling="cls")
    assert cls.latents.shape == (7, 16) and cls(x).shape == (5, 10)
    assert point_model()(torch.rand(3, 32, 3)).shape == (3, 5)


def test_padding_mask_hides_padded_points():
    m = point_model().eval()
    x = torch.rand(2, 20, 3)
    padded = torch.cat([x, 100 * torch.rand(2, 12, 3)], 1)
    mask = torch.zeros(2, 32, dtype=torch.bool)
    mask[:, :20] = True
    out, maps = m(padded, mask=mask, return_attention=True)
    assert torch.allclose(out, m(x), atol=1e-5)
    assert maps[..., 20:].abs().max() == 0


def test_fourier_features_match_the_formula():
    coords = torch.tensor([[-1.0, 0.25], [0.5, 1.0]])
    k, fmax = 3, 10.0
    got = fourier_features(coords, k, fmax)
    freqs = np.linspace(1.0, fmax / 2, k)
    for i in range(2):
        want = []
        for x in coords[i].tolist():
            want += [x] + [math.sin(math.pi * f * x) for f in freqs] + [math.cos(math.pi * f * x) for f in freqs]
        assert np.allclose(got[i].numpy(), want, atol=1e-5)
    g = grid_coords(4, 4)
    assert g.shape == (16, 2) and g.min() == -1 and g.max() == 1 and torch.allclose(g[1], torch.tensor([-1.0, -1 / 3]))


def test_pixel_permutation_is_fixed_and_the_same_for_train_and_test():
    a, b = image_model(permute_pixels=True, permute_seed=7), image_model(permute_pixels=True, permute_seed=7)
    c = image_model(permute_pixels=True, permute_seed=8)
    assert torch.equal(a.pixel_perm, b.pixel_perm) and not torch.equal(a.pixel_perm, c.pixel_perm)
    assert torch.equal(a.pixel_perm.sort().values, torch.arange(64))
    x = torch.rand(2, 3, 8, 8)
    pix = (x.flatten(2).transpose(1, 2) - 0.5) / 0.25
    a.train()
    train_tokens = a.tokens(x)
    a.eval()
    assert torch.equal(train_tokens, a.tokens(x))
    assert torch.allclose(train_tokens[..., :3], pix[:, a.pixel_perm])
    assert torch.equal(image_model().pixel_perm, torch.arange(64))  # off by default


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_weight_sharing_shares_and_no_sharing_does_not():
    shared, separate = image_model(weight_sharing="port"), image_model(weight_sharing="none")
    assert shared.cross[1] is shared.cross[2] and shared.cross[0] is not shared.cross[1]
    assert shared.transformers[1] is shared.transformers[2] and shared.transformers[0] is not shared.transformers[1]
    assert len({id(c) for c in separate.cross}) == 3 and len({id(t) for t in separate.transformers}) == 3
    per_repeat = n_params(separate.cross[0]) + n_params(separate.transformers[0])
    assert n_params(separate) - n_params(shared) == per_repeat  # exactly one repeat's weights saved
    shared(torch.rand(2, 3, 8, 8)).sum().backward()
    assert shared.cross[1].q.weight.grad is not None


def test_learned_pe_is_a_parameter_and_fourier_is_not():
    assert isinstance(image_model(use_learned_pe=True, pe_dim=12).learned_pe, torch.nn.Parameter)
    m = image_model()
    assert "fixed_pe" in dict(m.named_buffers()) and m.fixed_pe.shape == (64, 2 * (2 * 4 + 1))


def test_latents_start_small():
    m = Perceiver(num_classes=10, input_kind="image", num_tokens=1024, image_size=32, **CIFAR)
    assert m.latents.shape == (96, 384) and 0.015 < m.latents.std().item() < 0.025


# ----------------------------------------------------------------------------- LAMB
def test_lamb_step_against_hand_computation():
    torch.manual_seed(0)
    w0 = torch.randn(3, 4)
    zero = torch.zeros(5)
    w = torch.nn.Parameter(w0.clone())
    z = torch.nn.Parameter(zero.clone())
    opt = Lamb([w, z], lr=0.1, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01)
    grads = [torch.randn(3, 4), torch.randn(3, 4)]
    ref, m, v = w0.double().numpy().copy(), 0, 0
    for t, g in enumerate(grads, start=1):
        w.grad, z.grad = g.clone(), torch.ones(5)
        opt.step()
        gn = g.double().numpy()
        m = 0.9 * m + 0.1 * gn
        v = 0.99 * v + 0.01 * gn ** 2
        u = (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.99 ** t)) + 1e-6) + 0.01 * ref
        ref = ref - 0.1 * (np.linalg.norm(ref) / np.linalg.norm(u)) * u
        assert np.allclose(w.detach().double().numpy(), ref, atol=1e-5)
    # ||w|| = 0 at the first step: trust ratio 1, so the step is lr * u (u = 1/(1+eps) elementwise)
    assert not torch.allclose(z.detach(), zero)


def test_lamb_zero_weight_uses_trust_ratio_one():
    z = torch.nn.Parameter(torch.zeros(4))
    opt = Lamb([z], lr=0.5, eps=1e-6)
    z.grad = torch.full((4,), 2.0)
    opt.step()
    assert torch.allclose(z.detach(), torch.full((4,), -0.5 / (1 + 1e-6)), atol=1e-6)


# ----------------------------------------------------------------------------- ModelNet40
CUBE_V = [(x, y, z) for x in (0, 2) for y in (0, 2) for z in (0, 2)]
CUBE_QUADS = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]


def off_text(one_line_header: bool, scale=1.0):
    v = "\n".join(f"{scale * x} {scale * y} {scale * z}" for x, y, z in CUBE_V)
    f = "\n".join(f"4 {' '.join(map(str, q))}" for q in CUBE_QUADS)
    head = f"OFF{len(CUBE_V)} {len(CUBE_QUADS)} 0" if one_line_header else f"OFF\n{len(CUBE_V)} {len(CUBE_QUADS)} 0"
    return f"{head}\n{v}\n{f}\n"


def tetra_text():
    return "OFF\n4 4 0\n0 0 0\n1 0 0\n0 1 0\n0 0 1\n3 0 1 2\n3 0 1 3\n3 0 2 3\n3 1 2 3\n"


def write_modelnet(root: Path):
    files = {}
    for split, n in (("train", 3), ("test", 2)):
        for i in range(n):
            files[f"ModelNet40/cube/{split}/cube_{i:04d}.off"] = off_text(one_line_header=(i % 2 == 0), scale=1 + i)
            files[f"ModelNet40/airplane/{split}/airplane_{i:04d}.off"] = tetra_text()
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return files


def test_parse_off_both_header_forms_and_fan_triangulation():
    for one_line in (True, False):
        verts, tris = pc.parse_off(off_text(one_line))
        assert verts.shape == (8, 3) and tris.shape == (12, 3)
    with pytest.raises(ValueError):
        pc.parse_off("PLY\n")


def check_clouds(tx, ty, vx, vy, classes, n=pc.NUM_POINTS):
    assert classes == ["airplane", "cube"]
    assert tx.shape == (6, n, 3) and vx.shape == (4, n, 3) and tx.dtype == torch.float32
    assert torch.equal(ty, torch.tensor([0, 0, 0, 1, 1, 1])) and torch.equal(vy, torch.tensor([0, 0, 1, 1]))
    norms = tx.norm(dim=-1)
    assert torch.allclose(norms.amax(1), torch.ones(6), atol=1e-5)
    assert tx.mean(1).abs().max() < 1e-5
    for cloud in tx[ty == 1]:
        # on the surface of an axis-aligned cube every sample has some coordinate on a face plane,
        # i.e. equal to that axis's minimum or maximum over the cloud
        lo, hi = cloud.amin(0), cloud.amax(0)
        on_face = ((cloud - lo).abs() < 1e-5) | ((cloud - hi).abs() < 1e-5)
        assert on_face.any(-1).all()


def test_modelnet40_from_off_folder_is_sampled_and_cached(tmp_path):
    write_modelnet(tmp_path)
    check_clouds(*pc.load_modelnet40(tmp_path, download_ok=False))
    assert (tmp_path / "modelnet40_2048_v1.pt").is_file()
    again = pc.load_modelnet40(tmp_path, download_ok=False)
    assert torch.equal(again[0], pc.load_modelnet40(tmp_path, download_ok=False)[0])


def test_modelnet40_from_zip_and_corrupt_zip(tmp_path):
    files = write_modelnet(tmp_path / "src")
    z = tmp_path / "data" / "ModelNet40.zip"
    z.parent.mkdir()
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as f:
        for rel, text in files.items():
            f.writestr(rel, text)
    check_clouds(*pc.load_modelnet40(tmp_path / "data", download_ok=False, num_points=256), n=256)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ModelNet40.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(Exception, match="zip"):
        pc.load_modelnet40(bad, download_ok=False)
    assert not list(bad.glob("modelnet40_*.pt"))


def test_modelnet40_missing_says_what_to_do(tmp_path):
    with pytest.raises(Exception, match="ModelNet40.zip"):
        pc.load_modelnet40(tmp_path, download_ok=False)


def test_modelnet40_hdf5(tmp_path):
    h5py = pytest.importorskip("h5py")
    folder = tmp_path / "modelnet40_ply_hdf5_2048"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("ply_data_train0.h5", 5), ("ply_data_train1.h5", 3), ("ply_data_test0.h5", 4)):
        with h5py.File(folder / name, "w") as h:
            h["data"] = (rng.standard_normal((n, 2048, 3)) * 3 + 5).astype(np.float32)
            h["label"] = rng.integers(0, 40, (n, 1)).astype(np.uint8)
    (folder / "shape_names.txt").write_text("\n".join(f"s{i}" for i in range(40)))
    tx, ty, vx, vy, classes = pc.load_modelnet40(tmp_path, download_ok=False)
    assert tx.shape == (8, 2048, 3) and vx.shape == (4, 2048, 3) and len(classes) == 40
    assert torch.allclose(tx.norm(dim=-1).amax(1), torch.ones(8), atol=1e-5)


def test_random_scale_is_small_and_per_axis():
    g = torch.Generator().manual_seed(0)
    x = torch.ones(64, 10, 3)
    s = pc.random_scale(x, g)
    assert 0.9 <= s.min() and s.max() <= 1.1 and torch.equal(s[:, 0], s[:, 5])


def reference_lamb_step(ws, grads, state, lr, b1, b2, eps, wd):
    """The per-tensor loop LAMB this suite used before (the formulas of the docstring, one tensor at a time)."""
    for i, (w, g) in enumerate(zip(ws, grads)):
        s = state.setdefault(i, dict(t=0, m=torch.zeros_like(w), v=torch.zeros_like(w)))
        s["t"] += 1
        s["m"] = b1 * s["m"] + (1 - b1) * g
        s["v"] = b2 * s["v"] + (1 - b2) * g * g
        u = (s["m"] / (1 - b1 ** s["t"])) / ((s["v"] / (1 - b2 ** s["t"])).sqrt() + eps) + wd * w
        wn, un = w.norm(), u.norm()
        trust = wn / un if wn > 0 and un > 0 else 1.0
        w -= lr * trust * u


def test_multi_tensor_lamb_equals_the_per_tensor_loop_step_for_step():
    torch.manual_seed(0)
    shapes = [(8, 4), (4,), (3, 3, 2), (5,)]
    init = [torch.randn(s) if i != 3 else torch.zeros(s) for i, s in enumerate(shapes)]
    params = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [t.clone().double() for t in init]
    opt = Lamb(params, lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1)
    state = {}
    for _ in range(5):
        grads = [torch.randn(s) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        reference_lamb_step(ref, [g.double() for g in grads], state, 0.01, 0.9, 0.999, 1e-6, 0.1)
        for p, r in zip(params, ref):
            assert torch.allclose(p.detach().double(), r, atol=1e-6)


def test_make_lamb_exempts_biases_and_norms_from_decay():
    from perceiver.lamb import make_lamb
    m = Perceiver(num_classes=10, input_kind="image", num_tokens=64, image_size=8, mean=(0.5,) * 3, std=(0.25,) * 3,
                  num_latents=4, latent_dim=16, num_cross_attend_stages=1, num_transformer_blocks=1, num_heads=2,
                  num_bands=2, use_learned_pe=True)
    opt = make_lamb(m.parameters(), dict(lr=0.001, weight_decay=0.1))
    decayed, exempt = opt.param_groups
    names = {id(p): n for n, p in m.named_parameters()}
    assert decayed["weight_decay"] == 0.1 and exempt["weight_decay"] == 0.0
    assert {names[id(p)] for p in decayed["params"]} >= {"latents", "learned_pe", "head.1.weight"}
    exempt_names = {names[id(p)] for p in exempt["params"]}
    assert exempt_names and all(n.endswith(".bias") or ".norm" in n or n.startswith("head.0") or "mlp.0" in n
                                for n in exempt_names), exempt_names


def test_latents_and_learned_pe_are_truncated_at_two_sigma():
    torch.manual_seed(0)
    m = Perceiver(num_classes=10, input_kind="image", num_tokens=1024, image_size=32, mean=(0.5,) * 3,
                  std=(0.25,) * 3, num_latents=256, latent_dim=256, num_cross_attend_stages=1, num_transformer_blocks=1,
                  num_heads=2, num_bands=2, use_learned_pe=True)
    for t in (m.latents, m.learned_pe):
        assert t.abs().max().item() <= 0.04 + 1e-7 and t.abs().max().item() > 0.035


def test_paper_weight_sharing_shares_one_latent_transformer_over_all_repeats():
    paper, port = image_model(), image_model(weight_sharing="port")
    assert len({id(t) for t in paper.transformers}) == 1
    assert paper.cross[0] is not paper.cross[1] and paper.cross[1] is paper.cross[2]
    assert n_params(port) - n_params(paper) == n_params(paper.transformers[0])  # one transformer fewer
    assert {id(p) for p in paper.parameters()} == {id(p) for p in set(paper.parameters())}


def test_paper_order_permutation_leaves_a_fourier_perceiver_unchanged():
    torch.manual_seed(0)
    plain = image_model().eval()
    x = torch.rand(2, 3, 8, 8)
    for order, same in (("after_pe", True), ("before_pe", False)):
        torch.manual_seed(0)
        perm = image_model(permute_pixels=True, permute_seed=3, permute_order=order).eval()
        perm.load_state_dict({k: v for k, v in plain.state_dict().items() if k != "pixel_perm"}, strict=False)
        assert not torch.equal(perm.pixel_perm, torch.arange(64))
        with torch.no_grad():
            diff = (perm(x) - plain(x)).abs().max().item()
        assert (diff < 1e-5) == same, (order, diff)


def test_exp13_flags_switch_off_and_help_shows_each_experiments_defaults():
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "exp13_perceiver.py"), "--help"], capture_output=True, text=True,
                         timeout=120).stdout
    assert "--no-learned-pe" in out and "--no-permute-pixels" in out and "--weight-sharing" in out
    from harness.config import resolve_config
    import exp13_perceiver as e13
    cfg, changed = resolve_config("exp13_perceiver", e13.SETUP, e13.GRID, "cifar10_permuted_learned", 0, False,
                                  {"permute_pixels": False, "use_learned_pe": False})
    assert not cfg["permute_pixels"] and not cfg["use_learned_pe"] and set(changed) == {"permute_pixels", "use_learned_pe"}


def test_lamb_steps_bf16_weights_by_the_float32_update_takes_a_closure_and_rejects_bad_settings():
    torch.manual_seed(1)
    w0, g = torch.randn(6, 5), torch.randn(6, 5)
    low = torch.nn.Parameter(w0.bfloat16())
    idle = torch.nn.Parameter(torch.randn(3))  # a group whose parameters have no gradient is left alone
    opt = Lamb([dict(params=[low]), dict(params=[idle])], lr=0.05, weight_decay=0.01)
    ref, before_idle = [low.detach().float().double()], idle.detach().clone()

    def closure():
        low.grad = g.bfloat16()
        return torch.tensor(3.0)

    assert opt.step(closure).item() == 3.0  # the closure ran (under grad) and its loss is returned
    reference_lamb_step(ref, [g.bfloat16().double()], {}, 0.05, 0.9, 0.999, 1e-6, 0.01)
    assert low.dtype == torch.bfloat16 and torch.equal(idle.detach(), before_idle) and not opt.state[idle]
    moved = low.detach().double() - w0.bfloat16().double()  # the float32 update, added in bf16:
    assert moved.abs().min() > 0 and torch.allclose(low.detach().double(), ref[0], rtol=2 ** -7, atol=2 ** -10)
    for bad in (dict(lr=0.0), dict(eps=-1.0), dict(weight_decay=-0.1), dict(betas=(0.9, 1.0))):
        with pytest.raises(ValueError, match="invalid LAMB settings"):
            Lamb([torch.nn.Parameter(torch.ones(2))], **bad)


def test_attention_slots_map_back_to_the_pixels_they_carry():
    from reporting.plots import slots_to_image
    x = torch.rand(1, 3, 8, 8)
    for kw in (dict(), dict(permute_pixels=True), dict(permute_pixels=True, permute_order="before_pe")):
        m = image_model(**kw)
        assert torch.equal(m.pixel_perm, torch.arange(64)) == (not kw)  # permuted only when asked
        red = m.tokens(x)[0, :, 0]  # slot j's normalised red value
        back = torch.from_numpy(slots_to_image(red, m.pixel_perm, 8, 8))
        assert torch.allclose(back, (x[0, 0] - m.mean.flatten()[0]) / m.std.flatten()[0], atol=1e-6), kw
