"""Datasets as whole uint8 tensors, a GPU-resident batch loader, and Mixup/CutMix.

load_dataset(name, data_dir) -> (train_x, train_y, test_x, test_y, classes)
    x: uint8 (N, 3, H, W) images (or float32 (N, P, 3) point clouds), y: int64 (N,).
Sources: CIFAR-10/100 python pickles (archive downloaded with its md5 checked), Tiny-ImageNet
(the cs231n zip with md5, the zip already present, or an extracted folder; val/ is the test
split, labelled by val/val_annotations.txt; decoded once in parallel and cached as uint8),
ModelNet40 (pointclouds.py) and a learnable synthetic set for --smoke.
Every file written here goes to a temporary name first and is moved into place with os.replace,
so a failed or killed run never leaves a half-written archive, folder or cache behind.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import tarfile
import tempfile
import threading
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


class DataError(RuntimeError):
    """Missing, corrupt or mismatching data: the message says what to do."""


# name -> facts used by the models and the loader (mean/std of the training pixels in [0, 1])
DATASETS = {
    "cifar10": dict(num_classes=10, image_size=32, pad=4,
                    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    "cifar100": dict(num_classes=100, image_size=32, pad=4,
                     mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
    "tinyimagenet": dict(num_classes=200, image_size=64, pad=4,
                         mean=(0.4802, 0.4481, 0.3975), std=(0.2302, 0.2265, 0.2262)),
}

CIFAR_SOURCES = {
    "cifar10": dict(url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                    md5="c58f30108f718f92721af3b95e74349a", folder="cifar-10-batches-py",
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
                    label_key=b"labels", meta="batches.meta", names_key=b"label_names"),
    "cifar100": dict(url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                     md5="eb9058c3a382ffc7106e4002c42a8d85", folder="cifar-100-python",
                     train=["train"], test=["test"],
                     label_key=b"fine_labels", meta="meta", names_key=b"fine_label_names"),
}
TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
TINY_CACHE = "tinyimagenet_uint8_v1.pt"


# ----------------------------------------------------------------------------- files
def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save to a temp file in the same folder, then os.replace: all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def search_roots(data_dir: Path) -> list[Path]:
    """data_dir, plus Kaggle's read-only /kaggle/input/<dataset>[/<sub>] folders when present."""
    roots = [Path(data_dir)]
    kaggle = Path("/kaggle/input")
    if kaggle.is_dir():
        roots += sorted(p for p in kaggle.glob("*") if p.is_dir())
        roots += sorted(p for p in kaggle.glob("*/*") if p.is_dir())
    return roots


def find_in_roots(data_dir: Path, name: str, is_kind=Path.is_dir) -> Path | None:
    """The first <root>/<name> over search_roots(data_dir) that passes is_kind (a folder by default)."""
    return next((r / name for r in search_roots(data_dir) if is_kind(r / name)), None)


def cache_path(data_dir: Path, name: str) -> Path:
    """Decoded-dataset cache in data_dir, or in ./data when data_dir is read-only (Kaggle input)."""
    data_dir = Path(data_dir)
    writable = os.access(data_dir, os.W_OK) or not data_dir.exists()
    return (data_dir if writable else Path("data")) / name


def load_cache(path: Path):
    """(train_x, train_y, test_x, test_y, classes) from a cache, or None if absent or unreadable."""
    if not path.is_file():
        return None
    try:
        d = torch.load(path, weights_only=True)
        return d["train_x"], d["train_y"], d["test_x"], d["test_y"], list(d["classes"])
    except Exception as e:  # a truncated cache is rebuilt, never trusted
        print(f"warning: cache {path} is unreadable ({e}); rebuilding it")
        return None


def save_cache(path: Path, tensors) -> None:
    keys = ("train_x", "train_y", "test_x", "test_y", "classes")
    atomic_torch_save(dict(zip(keys, tensors)), path)


def verify_md5(path: Path, md5: str, what: str) -> None:
    got = md5sum(path)
    if got != md5:
        raise DataError(f"{path} has md5 {got}, expected {md5} for {what}: the file is corrupt or "
                        f"a different archive; delete it and rerun to download it again, or pass "
                        f"--data-dir to a folder holding the extracted dataset")


def download(url: str, dest: Path, md5: str | None, verify=None) -> Path:
    """Download url to dest via a .part file, checked before it takes its final name: against its
    md5, or (for archives with no published checksum) by verify(path), which raises DataError."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0)
            with tqdm(total=total or None, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                while block := r.read(1 << 20):
                    f.write(block)
                    bar.update(len(block))
        verify_md5(part, md5, url) if md5 else verify(part)
    except DataError:
        part.unlink(missing_ok=True)
        raise
    except (OSError, ValueError) as e:
        part.unlink(missing_ok=True)
        raise DataError(f"could not download {url} ({e}); download it by hand and put it "
                        f"at {dest}, or attach it as a Kaggle dataset and pass --data-dir") from None
    os.replace(part, dest)
    return dest


def _fetch_archive(data_dir: Path, url: str, md5: str, download_ok: bool, what: str) -> Path:
    """An archive with the right md5: found under data_dir (or Kaggle input) or downloaded."""
    name = url.rsplit("/", 1)[-1]
    found = find_in_roots(data_dir, name, Path.is_file)
    if found:
        verify_md5(found, md5, what)
        return found
    if not download_ok:
        raise DataError(f"{what} not found: put {name} (from {url}, md5 {md5}) or its extracted "
                        f"folder in {data_dir}, or attach it as a Kaggle dataset (found under "
                        f"/kaggle/input automatically), or run without --no-download")
    return download(url, Path(data_dir) / name, md5)


# ----------------------------------------------------------------------------- CIFAR
def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def load_cifar(name: str, data_dir: Path, download_ok: bool = True):
    src = CIFAR_SOURCES[name]
    folder = find_in_roots(data_dir, src["folder"])
    if folder is None:
        archive = _fetch_archive(data_dir, src["url"], src["md5"], download_ok, name)
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=data_dir))
        try:
            with tarfile.open(archive) as tar:
                try:
                    tar.extractall(tmp, filter="data")  # refuses absolute paths and links out of tmp
                except TypeError:  # Python without extraction filters (< 3.10.12 / 3.11.4)
                    tar.extractall(tmp)
            folder = Path(data_dir) / src["folder"]
            os.replace(tmp / src["folder"], folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def read(files):
        try:
            parts = [_unpickle(folder / f) for f in files]
        except (OSError, pickle.UnpicklingError, EOFError) as e:
            raise DataError(f"cannot read {name} from {folder} ({e}); delete the folder and rerun") from None
        x = np.concatenate([p[b"data"] for p in parts]).reshape(-1, 3, 32, 32)
        y = np.concatenate([np.asarray(p[src["label_key"]]) for p in parts])
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8)), torch.from_numpy(y.astype(np.int64))

    train_x, train_y = read(src["train"])
    test_x, test_y = read(src["test"])
    classes = [c.decode() for c in _unpickle(folder / src["meta"])[src["names_key"]]]
    return train_x, train_y, test_x, test_y, classes


# ----------------------------------------------------------------------------- Tiny-ImageNet
def _decode_rgb(data: bytes, size: int = 64) -> np.ndarray:
    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)  # grayscale JPEGs become 3 channels
    if arr.shape != (size, size, 3):
        raise DataError(f"a Tiny-ImageNet image has shape {arr.shape}, expected ({size}, {size}, 3)")
    return arr.transpose(2, 0, 1)


class _TinySource:
    """Uniform read access to tiny-imagenet-200 as an extracted folder or as the zip."""

    def __init__(self, path: Path):
        self.path, self.is_zip = Path(path), zipfile.is_zipfile(path) if Path(path).is_file() else False
        self._local = threading.local()
        if self.is_zip:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
            top = "tiny-imagenet-200/"
            self.prefix = top if any(n.startswith(top) for n in names) else ""
            self.names = [n[len(self.prefix):] for n in names if n.startswith(self.prefix)]
        else:
            self.prefix = ""
            self.names = [str(p.relative_to(path)).replace(os.sep, "/") for p in Path(path).rglob("*")]

    def read(self, rel: str) -> bytes:
        if not self.is_zip:
            return (self.path / rel).read_bytes()
        if not hasattr(self._local, "zip"):  # one handle per thread: ZipFile reads are not thread-safe
            self._local.zip = zipfile.ZipFile(self.path)
        return self._local.zip.read(self.prefix + rel)


def _tiny_index(src: _TinySource):
    try:
        wnids = sorted(set(src.read("wnids.txt").decode().split()))
        ann = src.read("val/val_annotations.txt").decode().splitlines()
    except (KeyError, FileNotFoundError) as e:
        raise DataError(f"{src.path} is not a tiny-imagenet-200 folder/zip ({e})") from None
    cls = {w: i for i, w in enumerate(wnids)}
    train = sorted((n, cls[n.split("/")[1]]) for n in src.names
                   if n.startswith("train/") and n.lower().endswith(".jpeg") and "/images/" in n)
    test = sorted((f"val/images/{line.split()[0]}", cls[line.split()[1]]) for line in ann if line.strip())
    if not train or not test:
        raise DataError(f"{src.path}: found {len(train)} train and {len(test)} val images; "
                        f"is the folder complete?")
    return wnids, train, test


def _decode_all(src: _TinySource, items, desc: str):
    x = np.empty((len(items), 3, 64, 64), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for i, arr in enumerate(tqdm(pool.map(lambda it: _decode_rgb(src.read(it[0])), items),
                                     total=len(items), desc=desc, unit="img")):
            x[i] = arr
    return torch.from_numpy(x), torch.tensor([c for _, c in items], dtype=torch.int64)


def load_tinyimagenet(data_dir: Path, download_ok: bool = True):
    cache = cache_path(data_dir, TINY_CACHE)
    cached = load_cache(cache)
    if cached is not None:
        return cached
    folder = find_in_roots(data_dir, "tiny-imagenet-200", lambda p: (p / "wnids.txt").is_file())
    src = _TinySource(folder if folder else
                      _fetch_archive(data_dir, TINY_URL, TINY_MD5, download_ok, "Tiny-ImageNet"))
    classes, train, test = _tiny_index(src)
    out = (*_decode_all(src, train, "decode Tiny-ImageNet train"), *_decode_all(src, test, "decode Tiny-ImageNet val"),
           classes)
    save_cache(cache, out)
    return out


# ----------------------------------------------------------------------------- synthetic
def synthetic_dataset(num_classes: int, image_size: int, n_train: int = 512, n_test: int = 256,
                      seed: int = 0):
    """Learnable images for --smoke: each class is a fixed low-frequency colour pattern + noise."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(num_classes, 3, 4, 4, generator=g)
    protos = F.interpolate(protos, size=(image_size, image_size), mode="nearest")

    def make(n):
        y = torch.randint(0, num_classes, (n,), generator=g)
        noise = torch.randn(n, 3, image_size, image_size, generator=g)
        x = (40 + 175 * protos[y] + 25 * noise).clamp(0, 255).to(torch.uint8)
        return x, y

    train_x, train_y = make(n_train)
    test_x, test_y = make(n_test)
    return train_x, train_y, test_x, test_y, [f"class{i}" for i in range(num_classes)]


def load_dataset(name: str, data_dir: str | Path = "data", download: bool = True):
    """(train_x, train_y, test_x, test_y, classes) for cifar10, cifar100, tinyimagenet, modelnet40."""
    data_dir = Path(data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # a read-only dataset folder (e.g. under /kaggle/input) is fine to read from
    if name in CIFAR_SOURCES:
        return load_cifar(name, data_dir, download)
    if name == "tinyimagenet":
        return load_tinyimagenet(data_dir, download)
    if name == "modelnet40":
        from pointclouds import load_modelnet40
        return load_modelnet40(data_dir, download)
    raise DataError(f"unknown dataset {name!r}; known: cifar10, cifar100, tinyimagenet, modelnet40")


# ----------------------------------------------------------------------------- GPU loader
def random_crop_flip(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Batched RandomCrop(size, padding=pad, zero fill) + RandomHorizontalFlip on (B, C, H, W)."""
    b, c, h, w = x.shape
    dev = x.device
    if pad:
        xp = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=g)
        dx = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=g)
        rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]
        x = xp[torch.arange(b, device=dev)[:, None, None, None],
               torch.arange(c, device=dev)[None, :, None, None], rows, cols]
    flip = torch.rand(b, device=dev, generator=g) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


class GpuLoader:
    """The whole dataset on `device`; batches drawn by a seeded per-epoch permutation.

    Yields (x, y): uint8 images come out as float32 in [0, 1], (B, C, H, W) channels_last
    (normalisation is the model's first op, so noise and FGSM act on real pixels); other dtypes
    pass through. `augment(x, generator)` runs on the device batch (before the float conversion
    for images). Training loaders shuffle and drop the last partial batch; batch order and
    augmentation depend only on (seed, epoch), so a resumed run sees the same batches.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, device, train: bool,
                 augment=None, seed: int = 0):
        self.x, self.y = x.to(device), y.to(device)
        self.batch_size, self.train, self.augment, self.seed = batch_size, train, augment, seed
        self.device = torch.device(device)

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def epoch(self, epoch: int = 0):
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed * 1_000_003 + epoch)
        n = len(self.y)
        order = torch.randperm(n, device=self.device, generator=g) if self.train else None
        for i in range(len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            idx = order[sl] if order is not None else sl
            xb, yb = self.x[idx], self.y[idx]
            if self.augment is not None:
                xb = self.augment(xb, g)
            yield to_input(xb), yb


def to_input(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 [0, 1] channels_last; anything else unchanged."""
    if x.dtype == torch.uint8:
        return x.float().div_(255).contiguous(memory_format=torch.channels_last)
    return x


def make_mixer(kind: str, num_classes: int, alpha: float = 1.0):
    """None, or a callable (x, y) -> (x_mixed, soft_targets (B, num_classes)) on the device batch.

    torchvision.transforms.v2.MixUp / CutMix draw their lambda and box from the global torch RNG,
    which the harness seeds and checkpoints. Soft targets go straight into F.cross_entropy.
    """
    if kind in (None, "", "none"):
        return None
    from torchvision.transforms import v2
    if kind == "mixup":
        return v2.MixUp(alpha=alpha, num_classes=num_classes)
    if kind == "cutmix":
        return v2.CutMix(alpha=alpha, num_classes=num_classes)
    raise ValueError(f"unknown mix {kind!r}; use none, mixup or cutmix")
