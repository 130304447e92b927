"""The data a sweep's runs train on: the dataset's entry, whether it is the real files or generated
(--smoke, --synthetic) and how many samples, and the dataset on the device, loaded once per sweep.

Every process loads it itself; the first that needs a download or a decode does it under the data
folder's lock (plumbing.files.prepare_once) while the others wait outside any collective, then read
its cache. Under torchrun the load runs under multigpu.agree: a failure on one rank fails it on all.
"""
from __future__ import annotations

from data_utils import Data, load_data
from harness import multigpu
from harness.registry import Registry


def data_kind(args) -> str:
    """What a command's runs train on: "smoke" (tiny generated data), "synthetic" (generated data of the
    real sizes) or "real" (the dataset's files); result.json records it."""
    return "smoke" if args.smoke else "synthetic" if args.synthetic else "real"


def dataset_for(cfg: dict, args, reg: Registry, datasets: dict, device) -> Data:
    """The run's dataset on the device, loaded once per sweep (one dataset on the device at a time).
    Every process loads it itself; the first to need a download or a decode does it under the data
    folder's lock while the others wait for it outside any collective, then read its cache."""
    if cfg["dataset"] not in datasets:
        datasets.clear()
        info = dataset_info(cfg, args, reg)
        datasets[cfg["dataset"]] = multigpu.agree(load_data, cfg["dataset"], info, device, args.data_dir,
                                                  not args.no_download, generated_sizes(cfg, args, info), reg.datasets)
    return datasets[cfg["dataset"]]


def dataset_info(cfg: dict, args, reg: Registry) -> dict:
    """The run's dataset entry; a --smoke run's images are smaller (the code path the same)."""
    info = dict(reg.datasets[cfg["dataset"]])
    if args.smoke and "image_size" in info:
        info["image_size"] = cfg["smoke_sizes"]["image_size"]
    return info


def generated_sizes(cfg: dict, args, info: dict) -> tuple[int, int] | None:
    """(n_train, n_test) of the data a run generates (--smoke, --synthetic), None for the real files."""
    if args.smoke:
        return cfg["smoke_sizes"]["n_train"], cfg["smoke_sizes"]["n_test"]
    return info.get("sizes") if args.synthetic else None
