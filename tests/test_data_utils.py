"""Loaders on small files generated in the exact published layouts (no dataset is downloaded; the
downloads under test come from a local HTTP server)."""
import hashlib
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

import batches
import data_utils as du
from layouts import WNIDS, colour, write_cifar10, write_cifar100, write_tiny_folder, write_tiny_zip


# ----------------------------------------------------------------------------- CIFAR
def md5(path):
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def test_cifar100_folder_layout(tmp_path):
    write_cifar100(tmp_path)
    tx, ty, vx, vy, classes = du.load_dataset("cifar100", tmp_path, download=False)
    assert tx.shape == (20, 3, 32, 32) and tx.dtype == torch.uint8 and ty.dtype == torch.int64
    assert vx.shape == (10, 3, 32, 32) and len(classes) == 100 and classes[3] == "c3"
    assert torch.equal(tx[:, 0, 0, 0].long(), 2 * ty) and torch.equal(tx.amax((1, 2, 3)), tx.amin((1, 2, 3)))


def test_cifar10_batches_and_archive_extraction(tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_cifar10(src)
    archive = tmp_path / "data" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setitem(du.CIFAR_SOURCES["cifar10"], "md5", md5(archive))
    tx, ty, vx, vy, classes = du.load_dataset("cifar10", tmp_path / "data", download=False)
    assert tx.shape == (20, 3, 32, 32) and vx.shape == (4, 3, 32, 32)
    assert torch.equal(tx[:, 2, 5, 7].long(), 10 * ty)
    assert (tmp_path / "data" / "cifar-10-batches-py").is_dir()
    assert not list((tmp_path / "data").glob(".extract-*"))


def test_cifar_archive_with_wrong_md5_is_refused(tmp_path):
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"not the archive")
    with pytest.raises(du.DataError, match="md5"):
        du.load_dataset("cifar100", tmp_path, download=False)
    assert not (tmp_path / "cifar-100-python").exists()


def test_missing_data_without_download_says_what_to_do(tmp_path):
    with pytest.raises(du.DataError, match=r"cifar-100-python.tar.gz.*--no-download"):
        du.load_dataset("cifar100", tmp_path, download=False)


def test_download_checks_md5_and_leaves_no_partial_file(tmp_path):
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"x" * 5000)
    good = du.download(payload.as_uri(), tmp_path / "out" / "a.bin", md5(payload))
    assert good.read_bytes() == payload.read_bytes()
    with pytest.raises(du.DataError, match="md5"):
        du.download(payload.as_uri(), tmp_path / "out" / "b.bin", "0" * 32)
    with pytest.raises(du.DataError, match="could not download"):
        du.download((tmp_path / "missing.zip").as_uri(), tmp_path / "out" / "c.bin", "0" * 32)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.bin"]


def test_a_download_over_a_socket_drops_a_killed_ones_part_file_and_ctrl_c_or_a_404_leaves_none(tmp_path, archive_server):
    server = archive_server({"a.bin": b"y" * 3000})
    out = tmp_path / "out"
    out.mkdir()
    (out / ".a.bin.killed.part").write_bytes(b"half")  # what a killed download left (the caller holds the lock)
    assert du.download(server.url("a.bin"), out / "a.bin", hashlib.md5(b"y" * 3000).hexdigest()).read_bytes() == b"y" * 3000

    def interrupted(path):  # Ctrl-C while the downloaded file is checked
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        du.download(server.url("a.bin"), out / "b.bin", None, verify=interrupted)
    with pytest.raises(du.DataError, match=r"could not download .*404.* by hand"):
        du.download(server.url("missing.bin"), out / "c.bin", "0" * 32)
    assert sorted(p.name for p in out.iterdir()) == ["a.bin"]


def test_an_archive_without_its_folder_or_cut_short_is_one_line_and_leaves_no_temp_folder(tmp_path):
    src = tmp_path / "src"
    write_cifar10(src)
    root = tmp_path / "data"
    root.mkdir()
    (root / ".extract-cifar-10-batches-py-killed").mkdir()  # what a killed extraction left
    wrong = root / "wrong.tar.gz"
    with tarfile.open(wrong, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="other-folder")
    with pytest.raises(du.DataError, match="holds no cifar-10-batches-py/ folder; delete it and rerun"):
        du.extract_tar(wrong, root, "cifar-10-batches-py")
    short = root / "short.tar.gz"
    with tarfile.open(short, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    short.write_bytes(short.read_bytes()[: short.stat().st_size // 2])
    with pytest.raises(du.DataError, match="cannot extract .*short.tar.gz.*delete it and rerun") as e:
        du.extract_tar(short, root, "cifar-10-batches-py")
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in root.iterdir()) == ["short.tar.gz", "wrong.tar.gz"]


# ----------------------------------------------------------------------------- Tiny-ImageNet
def check_tiny(tx, ty, vx, vy, classes):
    assert classes == sorted(WNIDS)
    assert tx.shape == (9, 3, 64, 64) and vx.shape == (6, 3, 64, 64) and tx.dtype == torch.uint8
    for x, y in ((tx, ty), (vx, vy)):
        expect = torch.tensor([colour(int(c)) for c in y], dtype=torch.float32)
        assert (x.float().mean((1, 2, 3)) - expect).abs().max() < 4


def test_tinyimagenet_extracted_folder(tmp_path):
    write_tiny_folder(tmp_path)
    out = du.load_dataset("tinyimagenet", tmp_path, download=False)
    check_tiny(*out)
    assert (tmp_path / du.TINY_CACHE).is_file()


def test_tinyimagenet_zip_is_decoded_once_then_cached(tmp_path, monkeypatch):
    z = write_tiny_zip(tmp_path / "tiny-imagenet-200.zip")
    monkeypatch.setattr(du, "TINY_MD5", md5(z))
    check_tiny(*du.load_dataset("tinyimagenet", tmp_path, download=False))
    z.unlink()  # the cache alone must now be enough
    check_tiny(*du.load_dataset("tinyimagenet", tmp_path, download=False))


def test_tinyimagenet_zip_with_wrong_md5_leaves_no_cache(tmp_path):
    write_tiny_zip(tmp_path / "tiny-imagenet-200.zip")
    with pytest.raises(du.DataError, match="md5"):
        du.load_dataset("tinyimagenet", tmp_path, download=False)
    assert not (tmp_path / du.TINY_CACHE).exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_truncated_cache_is_rebuilt(tmp_path):
    write_tiny_folder(tmp_path)
    (tmp_path / du.TINY_CACHE).write_bytes(b"\x80garbage")
    check_tiny(*du.load_dataset("tinyimagenet", tmp_path, download=False))


# ----------------------------------------------------------------------------- several processes at once
ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import hashlib, os, sys, time
from pathlib import Path
import data_utils as du
data_dir, name, url, md5, start = sys.argv[1:6]
if name == "tinyimagenet":
    du.TINY_URL, du.TINY_MD5 = url, md5
else:
    du.CIFAR_SOURCES[name].update(url=url, md5=md5)
Path(f"{start}.ready.{os.getpid()}").touch()
while not Path(start).exists():
    time.sleep(0.002)
try:
    tx, ty, vx, vy, classes = du.load_dataset(name, data_dir)
except du.DataError as e:  # as the scripts report it: one line, exit 1
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
h = hashlib.sha256(repr(classes).encode())
for t in (tx, ty, vx, vy):
    h.update(t.numpy().tobytes())
print("digest", h.hexdigest(), flush=True)
"""


def race_to_load(tmp_path, serve, name, archive: Path, n, checksum=None):
    """n processes, started together on a fresh folder, load `name` whose archive only the server has.
    The server holds the download until the n - 1 others say they wait. Returns (procs' (rc, out,
    err), the server's GET count of the archive, the data folder)."""
    data, logs = tmp_path / "data", tmp_path / "logs"
    logs.mkdir()
    start = tmp_path / "start"

    def waiting():
        return sum("waiting for" in p.read_text() for p in logs.glob("*.out"))
    server = serve({archive.name: archive.read_bytes()}, hold=lambda: waiting() >= n - 1)
    procs = []
    try:
        for i in range(n):
            with open(logs / f"{i}.out", "w") as out, open(logs / f"{i}.err", "w") as err:
                procs.append(subprocess.Popen([sys.executable, "-c", CHILD, str(data), name, server.url(archive.name),
                                               checksum or md5(archive), str(start)], cwd=ROOT, stdout=out, stderr=err))
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("start.ready.*"))) < n and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), (logs / "0.err").read_text()[-2000:]
            time.sleep(0.01)
        start.touch()
        for p in procs:
            p.wait(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = [(p.returncode, (logs / f"{i}.out").read_text(), (logs / f"{i}.err").read_text())
               for i, p in enumerate(procs)]
    return results, server.gets[f"/{archive.name}"], data


def check_race(results, gets, marker, n):
    assert all(rc == 0 for rc, _, _ in results), [err[-2000:] for _, _, err in results]
    assert not any("Traceback" in err for _, _, err in results)
    assert gets == 1  # one download
    assert sum(out.count(marker) for _, out, _ in results) == 1  # one extraction / decode + cache write
    assert sorted(out.count("waiting for") for _, out, _ in results) == [0] + [1] * (n - 1)  # one line each
    digests = {line for _, out, _ in results for line in out.splitlines() if line.startswith("digest ")}
    assert len(digests) == 1  # every process got the same data


@pytest.mark.parametrize("n", [2, 4])
def test_processes_fetching_cifar100_at_once_download_and_extract_it_once(tmp_path, archive_server, n):
    src = tmp_path / "src"
    write_cifar100(src)
    archive = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-100-python", arcname="cifar-100-python")
    results, gets, data = race_to_load(tmp_path, archive_server, "cifar100", archive, n)
    check_race(results, gets, "extracted cifar-100-python.tar.gz into", n)
    assert sorted(os.listdir(data)) == ["cifar-100-python", "cifar-100-python.tar.gz"]  # no temp, no lock left
    assert (data / "cifar-100-python.tar.gz").read_bytes() == archive.read_bytes()
    tx, ty, *_ = du.load_dataset("cifar100", data, download=False)
    assert torch.equal(tx[:, 0, 0, 0].long(), 2 * ty)


@pytest.mark.parametrize("n", [2, 4])
def test_processes_fetching_tinyimagenet_at_once_download_and_decode_it_once(tmp_path, archive_server, n):
    archive = write_tiny_zip(tmp_path / "tiny-imagenet-200.zip")
    results, gets, data = race_to_load(tmp_path, archive_server, "tinyimagenet", archive, n)
    check_race(results, gets, "cached tinyimagenet in", n)
    assert sorted(os.listdir(data)) == sorted(["tiny-imagenet-200.zip", du.TINY_CACHE])
    check_tiny(*du.load_dataset("tinyimagenet", data, download=False))


def test_when_the_download_fails_every_waiting_process_says_so_and_none_downloads_again(tmp_path, archive_server):
    archive = tmp_path / "cifar-100-python.tar.gz"
    archive.write_bytes(b"a page of an error, not the archive")
    results, gets, data = race_to_load(tmp_path, archive_server, "cifar100", archive, 4, checksum="0" * 32)
    assert gets == 1  # the holder's attempt only: the three that waited take its failure as theirs
    assert all(rc == 1 for rc, _, _ in results) and not any("Traceback" in err for _, _, err in results)
    lines = {err.strip().splitlines()[-1] for _, _, err in results}  # (the holder's stderr also has its bar)
    assert len(lines) == 1 and "md5" in lines.pop()  # one line, the same in every process
    assert not list(data.glob("*.part")) and not list(data.glob("cifar-100-python*"))


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path, monkeypatch, write_lease, dead_pid, capsys):
    write_tiny_folder(tmp_path)
    write_lease(tmp_path / ".lock-tinyimagenet.1.json", pid=dead_pid, what="preparing tinyimagenet")
    check_tiny(*du.load_dataset("tinyimagenet", tmp_path, download=False))
    out = capsys.readouterr().out
    assert "taking over the dead here lock of" in out and out.count("cached tinyimagenet in") == 1
    assert not list(tmp_path.glob(".lock-*"))


def test_an_os_error_while_extracting_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_cifar10(src)
    data = tmp_path / "data"
    data.mkdir()
    with tarfile.open(data / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setitem(du.CIFAR_SOURCES["cifar10"], "md5", md5(data / "cifar-10-python.tar.gz"))

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(tarfile.TarFile, "extractall", full)
    with pytest.raises(du.DataError) as e:
        du.load_dataset("cifar10", data, download=False)
    assert "No space left on device" in str(e.value) and "free space" in str(e.value) and "\n" not in str(e.value)
    # no temp folder, no lock; the failure's line stays for processes that were waiting for it
    assert sorted(os.listdir(data)) == [".failed-cifar10.json", "cifar-10-python.tar.gz"]


# ----------------------------------------------------------------------------- loader
def make_loader(train=True, seed=0, n=50, bs=16):
    x = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 3, 8, 8).contiguous()
    y = torch.arange(n)
    aug = (lambda xb, g: batches.random_crop_flip(xb, g, pad=2)) if train else None
    return batches.GpuLoader(x, y, bs, "cpu", train=train, augment=aug, seed=seed)


def test_loader_is_deterministic_per_seed_and_epoch():
    a = [(x.clone(), y.clone()) for x, y in make_loader().epoch(3)]
    b = [(x.clone(), y.clone()) for x, y in make_loader().epoch(3)]
    c = [y for _, y in make_loader().epoch(4)]
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not all(torch.equal(y1, y2) for (_, y1), y2 in zip(a, c))


def test_loader_shapes_drop_last_and_eval_coverage():
    train = list(make_loader().epoch(0))
    assert len(train) == 3 and all(x.shape == (16, 3, 8, 8) for x, _ in train)
    x, _ = train[0]
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    assert 0.0 <= x.min() and x.max() <= 1.0
    ys = torch.cat([y for _, y in make_loader(train=False).epoch()])
    assert torch.equal(ys, torch.arange(50))  # eval: every sample once, in order


def test_random_crop_flip_is_a_padded_crop_or_its_mirror():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (64, 3, 8, 8), dtype=torch.uint8)
    out = batches.random_crop_flip(x, g, pad=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    flips = 0
    for i in range(len(x)):
        crops = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        plain = any(torch.equal(out[i], c) for c in crops)
        mirrored = any(torch.equal(out[i], c.flip(2)) for c in crops)
        assert plain or mirrored
        flips += mirrored and not plain
    assert 10 < flips < 54  # about half flipped


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixers_give_soft_targets(kind):
    torch.manual_seed(0)
    mix = batches.make_mixer(kind, 10)
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 10, (8,))
    xm, t = mix(x, y)
    assert xm.shape == x.shape and t.shape == (8, 10)
    assert torch.allclose(t.sum(1), torch.ones(8))
    assert batches.make_mixer("none", 10) is None


def test_synthetic_set_is_learnable_by_nearest_prototype():
    tx, ty, vx, vy, _ = du.synthetic_dataset(5, 16, 200, 100, seed=0)
    means = torch.stack([tx[ty == c].float().mean(0) for c in range(5)])
    pred = ((vx.float()[:, None] - means[None]) ** 2).sum((2, 3, 4)).argmin(1)
    assert (pred == vy).float().mean() > 0.9
