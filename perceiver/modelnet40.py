"""ModelNet40 point clouds: (N, P, 3) float32 in the unit sphere, int64 labels.

Sources, in order: the cache data/modelnet40_<P>_v1.pt; `modelnet40_ply_hdf5_2048/` (the PointNet
HDF5 files, needs h5py; 2048 points per shape); the Princeton meshes `ModelNet40/<class>/{train,test}/
*.off` (extracted, or ModelNet40.zip, downloaded from modelnet.cs.princeton.edu if absent). Meshes are
sampled to P points uniformly over their surface (triangles drawn with probability proportional to
their area, uniform barycentric coordinates), seeded per file, in parallel processes, and cached
atomically. Princeton publishes no checksum for ModelNet40.zip, so the zip is verified member by
member against its CRC-32s (zipfile.testzip) instead of an md5. Every cloud is centred and scaled to
the unit sphere. Training augmentation: a random per-axis scaling in [0.9, 1.1].
"""
from __future__ import annotations

import os
import zipfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from plumbing.progress import tqdm

from plumbing.files import DataError, cached, download, find_in_roots, writable_dir

MODELNET_URL = "http://modelnet.cs.princeton.edu/ModelNet40.zip"
NUM_POINTS = 2048


def parse_off(text: str) -> tuple[np.ndarray, np.ndarray]:
    """OFF text -> vertices (V, 3) float64, triangles (T, 3) int (polygons fan-triangulated).

    Accepts the standard header ("OFF" then "V F E" on the next line) and the variant found in
    real ModelNet files with both on one line ("OFF490 518 0").
    """
    lines = [ln.split("#")[0].strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines or not lines[0].startswith("OFF"):
        raise ValueError("not an OFF file (no OFF header)")
    head = lines[0][3:].split()
    rest = lines[1:]
    if not head:
        head, rest = rest[0].split(), rest[1:]
    nv, nf = int(head[0]), int(head[1])
    verts = np.array(" ".join(rest[:nv]).split(), dtype=np.float64).reshape(nv, 3)
    tris = []
    for ln in rest[nv:nv + nf]:
        idx = [int(t) for t in ln.split()]
        poly = idx[1:1 + idx[0]]
        tris += [(poly[0], poly[i], poly[i + 1]) for i in range(1, len(poly) - 1)]
    return verts, np.array(tris, dtype=np.int64).reshape(-1, 3)


def sample_surface(verts: np.ndarray, tris: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n points uniform over the triangle surface: triangle ~ area, then uniform barycentric."""
    a, b, c = verts[tris[:, 0]], verts[tris[:, 1]], verts[tris[:, 2]]
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    if not np.isfinite(area).all() or area.sum() <= 0:
        raise ValueError("mesh has no surface area")
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(area), size=n, p=area / area.sum())
    r1, r2 = np.sqrt(rng.random((n, 1))), rng.random((n, 1))
    return (1 - r1) * a[pick] + r1 * (1 - r2) * b[pick] + r1 * r2 * c[pick]


def normalize_cloud(points: np.ndarray) -> np.ndarray:
    """Centre at the mean and scale so the farthest point is at distance 1."""
    p = points - points.mean(0)
    return (p / max(np.linalg.norm(p, axis=1).max(), 1e-12)).astype(np.float32)


def _mesh_to_cloud(job) -> np.ndarray:
    name, text, n = job
    verts, tris = parse_off(text)
    return normalize_cloud(sample_surface(verts, tris, n, seed=zlib.crc32(name.encode())))


def _read_meshes(source: Path):
    """(classes, [(split, rel name, class index, text)]) from an extracted ModelNet40/ or the zip."""
    if source.is_file():
        with zipfile.ZipFile(source) as z:
            names = [n for n in z.namelist() if n.endswith(".off") and "__MACOSX" not in n]
            read = lambda n: z.read(n).decode("latin-1")  # noqa: E731
            items = _index(names, read)
    else:
        names = [str(p.relative_to(source.parent)).replace(os.sep, "/") for p in source.rglob("*.off")]
        items = _index(names, lambda n: (source.parent / n).read_text("latin-1"))
    return items


def _index(names, read):
    parsed = [(n, n.split("/")) for n in sorted(names)]
    parsed = [(n, parts[-3], parts[-2]) for n, parts in parsed if len(parts) >= 3 and parts[-2] in ("train", "test")]
    classes = sorted({c for _, c, _ in parsed})
    if not classes:
        raise DataError("no ModelNet40/<class>/{train,test}/*.off meshes found")
    cls = {c: i for i, c in enumerate(classes)}
    return classes, [(split, n, cls[c], read(n)) for n, c, split in tqdm(parsed, desc="read meshes", unit="file")]


def _from_meshes(source: Path, n: int):
    classes, items = _read_meshes(source)
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        clouds = list(tqdm(pool.map(_mesh_to_cloud, [(name, text, n) for _, name, _, text in items], chunksize=16),
                           total=len(items), desc=f"sample {n} points per mesh", unit="mesh"))
    out = []
    for split in ("train", "test"):
        idx = [i for i, it in enumerate(items) if it[0] == split]
        out += [torch.from_numpy(np.stack([clouds[i] for i in idx])),
                torch.tensor([items[i][2] for i in idx], dtype=torch.int64)]
    return (*out, classes)


def _from_hdf5(folder: Path, n: int):
    try:
        import h5py
    except ImportError:
        raise DataError(f"{folder} holds HDF5 files: pip install h5py to read them") from None
    out = []
    for split in ("train", "test"):
        files = sorted(folder.glob(f"ply_data_{split}*.h5"))
        if not files:
            raise DataError(f"{folder} has no ply_data_{split}*.h5")
        xs, ys = [], []
        for f in files:
            with h5py.File(f, "r") as h:
                xs.append(np.asarray(h["data"], dtype=np.float32)[:, :n])
                ys.append(np.asarray(h["label"]).reshape(-1).astype(np.int64))
        out += [torch.from_numpy(np.stack([normalize_cloud(p) for p in np.concatenate(xs)])),
                torch.from_numpy(np.concatenate(ys))]
    names = folder / "shape_names.txt"
    classes = names.read_text().split() if names.is_file() else [str(i) for i in range(40)]
    return (*out, classes)


def load_modelnet40(data_dir: Path, download_ok: bool = True, num_points: int = NUM_POINTS):
    """From the cache, else fetched (or found) and sampled once, under the data lock."""
    return cached(data_dir, f"modelnet40_{num_points}_v1.pt", "modelnet40",
                  lambda: _decode_modelnet40(data_dir, download_ok, num_points))


def _decode_modelnet40(data_dir: Path, download_ok: bool, num_points: int):
    h5 = find_in_roots(data_dir, "modelnet40_ply_hdf5_2048")
    meshes = find_in_roots(data_dir, "ModelNet40")
    zipped = find_in_roots(data_dir, "ModelNet40.zip", Path.is_file)
    if h5 is not None and num_points <= 2048:
        return _from_hdf5(h5, num_points)
    if meshes is not None:
        return _from_meshes(meshes, num_points)
    if zipped is None:
        if not download_ok:
            raise DataError(f"ModelNet40 not found: put ModelNet40.zip (from {MODELNET_URL}) or its extracted "
                            f"ModelNet40/ folder, or modelnet40_ply_hdf5_2048/, in {data_dir}; or run without --no-download")
        zipped = download(MODELNET_URL, writable_dir(data_dir) / "ModelNet40.zip", md5=None, verify=verify_zip)
    else:
        verify_zip(zipped)  # a zip found in place; a download was checked before it took its name
    return _from_meshes(zipped, num_points)


def verify_zip(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path} is not a readable zip ({e}); delete it and rerun to download it again") from None
    if bad is not None:
        raise DataError(f"{path} is corrupt ({bad} fails its CRC check); delete it and rerun to download it again")


# ----------------------------------------------------------------------------- smoke data, augmentation
def synthetic_clouds(n_train: int, n_test: int, num_classes: int = 40, num_points: int = NUM_POINTS, seed: int = 0):
    """Learnable clouds for --smoke: points on an ellipsoid whose axes depend on the class."""
    g = torch.Generator().manual_seed(seed)
    axes = 0.3 + 0.7 * torch.rand(num_classes, 3, generator=g)

    def make(n):
        y = torch.randint(0, num_classes, (n,), generator=g)
        d = torch.randn(n, num_points, 3, generator=g)
        x = d / d.norm(dim=-1, keepdim=True) * axes[y][:, None]
        return x + 0.01 * torch.randn(x.shape, generator=g), y
    tx, ty = make(n_train)
    vx, vy = make(n_test)
    return tx, ty, vx, vy, [f"shape{i}" for i in range(num_classes)]


def random_scale(x: torch.Tensor, g: torch.Generator, low: float = 0.9, high: float = 1.1) -> torch.Tensor:
    """Per-sample, per-axis scaling of (B, P, 3) clouds by U(low, high)."""
    s = low + (high - low) * torch.rand(x.shape[0], 1, 3, device=x.device, generator=g)
    return x * s


# The dataset entry exp13 hands to the harness (datasets={"modelnet40": MODELNET40}).
MODELNET40 = dict(num_classes=40, kind="points", num_points=NUM_POINTS, augment=random_scale, sizes=(9_843, 2_468),
                  load=lambda data_dir, download_ok: load_modelnet40(data_dir, download_ok),
                  synthetic=lambda n_train, n_test: synthetic_clouds(n_train, n_test))
