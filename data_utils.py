"""Datasets as whole uint8 tensors, and one dataset on the device (Data); batches.py draws its batches.

load_dataset(name, data_dir) -> (train_x, train_y, test_x, test_y, classes)
    x: uint8 (N, 3, H, W) images (or float32 (N, P, 3) point clouds), y: int64 (N,).
Sources: CIFAR-10/100 python pickles (archive downloaded with its md5 checked), Tiny-ImageNet
(the cs231n zip with md5, the zip already present, or an extracted folder; val/ is the test
split, labelled by val/val_annotations.txt; decoded once in parallel and cached as uint8),
and a learnable synthetic set for --smoke (point clouds live in perceiver/modelnet40.py, which a script
passes in). Every file written here goes to a temporary name first and is moved into place with
os.replace (plumbing/files.py), so a failed or killed run never leaves a half-written archive or cache.
Several processes loading one dataset at once (workers on a fresh machine) download, extract and
decode it once: the first takes the data lock (plumbing.files.prepare_once), the others wait for it and then
read its folder or cache.
"""
from __future__ import annotations

import io
import os
import pickle
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from plumbing.progress import tqdm

from plumbing.files import DataError, cached, download, extract_tar, fetch_archive, find_in_roots, prepare_once  # noqa: F401

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


# ----------------------------------------------------------------------------- CIFAR
def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _extract_cifar(name: str, data_dir: Path, download_ok: bool) -> Path:
    """The extracted folder: found, or the archive fetched and extracted once (prepare_once)."""
    src = CIFAR_SOURCES[name]
    return prepare_once(data_dir, name, lambda: find_in_roots(data_dir, src["folder"]),
                        lambda root: extract_tar(fetch_archive(data_dir, src["url"], src["md5"], download_ok, name),
                                                 root, src["folder"]))


def load_cifar(name: str, data_dir: Path, download_ok: bool = True):
    src = CIFAR_SOURCES[name]
    folder = _extract_cifar(name, data_dir, download_ok)

    def unpickle(file):
        try:
            return _unpickle(folder / file)
        except (OSError, pickle.UnpicklingError, EOFError) as e:
            raise DataError(f"cannot read {name} from {folder} ({e}); delete the folder and rerun") from None

    def read(files):
        parts = [unpickle(f) for f in files]
        x = np.concatenate([p[b"data"] for p in parts]).reshape(-1, 3, 32, 32)
        y = np.concatenate([np.asarray(p[src["label_key"]]) for p in parts])
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8)), torch.from_numpy(y.astype(np.int64))

    train_x, train_y = read(src["train"])
    test_x, test_y = read(src["test"])
    classes = [c.decode() for c in unpickle(src["meta"])[src["names_key"]]]
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


def _decode_tinyimagenet(data_dir: Path, download_ok: bool):
    folder = find_in_roots(data_dir, "tiny-imagenet-200", lambda p: (p / "wnids.txt").is_file())
    src = _TinySource(folder if folder else
                      fetch_archive(data_dir, TINY_URL, TINY_MD5, download_ok, "Tiny-ImageNet"))
    classes, train, test = _tiny_index(src)
    return (*_decode_all(src, train, "decode Tiny-ImageNet train"), *_decode_all(src, test, "decode Tiny-ImageNet val"),
            classes)


def load_tinyimagenet(data_dir: Path, download_ok: bool = True):
    """From the cache, else fetched (or found) and decoded once, under the data lock."""
    return cached(data_dir, TINY_CACHE, "tinyimagenet", lambda: _decode_tinyimagenet(data_dir, download_ok))


# ----------------------------------------------------------------------------- synthetic
def synthetic_dataset(num_classes: int, image_size: int, n_train: int = 512, n_test: int = 256,
                      seed: int = 0, chunk: int = 8192):
    """Learnable images: each class is a fixed low-frequency colour pattern + noise (uint8, made in
    chunks so that real-size sets, e.g. Tiny-ImageNet's 100k at 64x64, need little extra memory)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(num_classes, 3, 4, 4, generator=g)
    protos = F.interpolate(protos, size=(image_size, image_size), mode="nearest")

    def make(n):
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = torch.empty(n, 3, image_size, image_size, dtype=torch.uint8)
        for s in range(0, n, chunk):
            noise = torch.randn(min(chunk, n - s), 3, image_size, image_size, generator=g)
            x[s:s + chunk] = (40 + 175 * protos[y[s:s + chunk]] + 25 * noise).clamp(0, 255).to(torch.uint8)
        return x, y

    train_x, train_y = make(n_train)
    test_x, test_y = make(n_test)
    return train_x, train_y, test_x, test_y, [f"class{i}" for i in range(num_classes)]


# name -> facts used by the models and the loader (mean/std of the training pixels in [0, 1]) and
# load(data_dir, download_ok) -> (train_x, train_y, test_x, test_y, classes); sizes = the real
# (n_train, n_test), which --synthetic generates. A script adds its own
# datasets (exp13: ModelNet40 from perceiver/modelnet40.py) by passing them to the harness, not by writing here.
DATASETS = {
    "cifar10": dict(num_classes=10, image_size=32, pad=4, load=partial(load_cifar, "cifar10"), sizes=(50_000, 10_000),
                    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    "cifar100": dict(num_classes=100, image_size=32, pad=4, load=partial(load_cifar, "cifar100"), sizes=(50_000, 10_000),
                     mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
    "tinyimagenet": dict(num_classes=200, image_size=64, pad=4, load=lambda d, ok: load_tinyimagenet(d, ok),
                         sizes=(100_000, 10_000),
                         mean=(0.4802, 0.4481, 0.3975), std=(0.2302, 0.2265, 0.2262)),
}


def load_dataset(name: str, data_dir: str | Path = "data", download: bool = True, datasets=None):
    """(train_x, train_y, test_x, test_y, classes) of a dataset in `datasets` (default DATASETS)."""
    datasets = DATASETS if datasets is None else datasets
    if name not in datasets:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(datasets)}")
    data_dir = Path(data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # a read-only dataset folder (e.g. under /kaggle/input) is fine to read from
    return datasets[name]["load"](data_dir, download)


# ----------------------------------------------------------------------------- a dataset on the device
@dataclass
class Data:
    """One dataset on the device, shared by every run of a sweep (info: the dataset's entry)."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    info: dict
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None

    @property
    def is_image(self) -> bool:
        return self.train_x.dtype == torch.uint8

    def with_validation(self, n: int) -> "Data":
        """A fixed hold-out of n training samples as the validation split (train shrinks by n)."""
        if n <= 0:
            return self
        if n >= len(self.train_y):
            raise ValueError(f"val_size {n} leaves no training data ({len(self.train_y)} samples)")
        order = self.fixed_subset(len(self.train_y), seed=2)
        val, train = order[:n], order[n:]
        return Data(self.train_x[train], self.train_y[train], self.test_x, self.test_y, self.info,
                    self.train_x[val], self.train_y[val])

    def fixed_subset(self, n: int, seed: int = 0) -> torch.Tensor:
        """Indices of a fixed training subset (the same for every run and seed)."""
        g = torch.Generator().manual_seed(seed)
        return torch.randperm(len(self.train_y), generator=g)[:n].to(self.train_y.device)


def load_data(name: str, info: dict, device, data_dir: Path, download_ok: bool,
              generated: tuple[int, int] | None = None, datasets=None) -> Data:
    """The dataset on `device`: real files, or generated data of (n_train, n_test) samples."""
    if generated is not None:
        make = info.get("synthetic") or partial(synthetic_dataset, info["num_classes"], info["image_size"])
        tensors = make(*generated)
    else:
        tensors = load_dataset(name, data_dir, download=download_ok, datasets=datasets)
    train_x, train_y, test_x, test_y, _ = tensors
    return Data(train_x.to(device), train_y.to(device), test_x.to(device), test_y.to(device), info)
