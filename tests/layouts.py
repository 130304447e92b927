"""Small datasets written in the exact published layouts (CIFAR-10/100 python pickles, the cs231n
Tiny-ImageNet folder and zip), for the loaders' tests and for commands run as a user runs them."""
import io
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


# ----------------------------------------------------------------------------- CIFAR
def write_cifar100(root: Path, n_train=20, n_test=10):
    """cifar-100-python/{train,test,meta}: every pixel of image i equals 2 * its fine label."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = [i % 100 for i in range(n)]
        data = np.repeat(np.array(labels, dtype=np.uint8)[:, None] * 2, 3072, axis=1)
        with open(folder / split, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": labels, b"coarse_labels": [0] * n}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, f)
    return folder


def write_cifar10(root: Path, per_batch=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [random.Random(name).randrange(10) for _ in range(per_batch)]
        data = np.stack([np.full(3072, 10 * y, dtype=np.uint8) for y in labels])
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"k{i}".encode() for i in range(10)]}, f)


# ----------------------------------------------------------------------------- Tiny-ImageNet
WNIDS = ["n09999999", "n01443537", "n04067472"]  # deliberately unsorted, as in the real wnids.txt


def colour(label):  # a solid colour survives JPEG within a few levels
    return 40 + 80 * label


def jpeg(value, gray=False):
    buf = io.BytesIO()
    Image.new("L" if gray else "RGB", (64, 64), value if gray else (value,) * 3).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def tiny_files(per_class=3, n_val=6):
    """relative path -> bytes, in the cs231n layout; one val image is grayscale."""
    sorted_ids = sorted(WNIDS)
    files = {"wnids.txt": ("\n".join(WNIDS) + "\n").encode(),
             "words.txt": "".join(f"{w}\tthing {w}\n" for w in WNIDS).encode()}
    for w in WNIDS:
        for i in range(per_class):
            files[f"train/{w}/images/{w}_{i}.JPEG"] = jpeg(colour(sorted_ids.index(w)))
        files[f"train/{w}/{w}_boxes.txt"] = b""
    lines = []
    for i in range(n_val):
        w = WNIDS[i % 3]
        files[f"val/images/val_{i}.JPEG"] = jpeg(colour(sorted_ids.index(w)), gray=(i == 4))
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    random.Random(0).shuffle(lines)
    files["val/val_annotations.txt"] = ("\n".join(lines) + "\n").encode()
    files["test/images/test_0.JPEG"] = jpeg(0)
    return files


def write_tiny_folder(root: Path):
    for rel, data in tiny_files().items():
        p = root / "tiny-imagenet-200" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def write_tiny_zip(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for rel, data in tiny_files().items():
            z.writestr("tiny-imagenet-200/" + rel, data)
    return path
