"""Optional live monitoring (--tensorboard): one TensorBoard run per run folder, <run-dir>/tensorboard/.

    tensorboard --logdir results          # every run of every experiment, named by its folder

Per finished epoch (x = epoch): loss/train, acc/train_running, acc/<val|test>, loss/<val|test>,
lr, images_per_s, epoch_time_s, and per hooked layer `entropy/<layer>/probe` (eval-mode H on the
probe batch), `entropy/<layer>/penalised` (the train-mode H SES penalised, mean over the epoch's SES
steps) and `entropy/<layer>/target`. Written from the epoch's history row, after the checkpoint, so
it costs no host sync of its own. A resumed run appends to the same folder. Without the
`tensorboard` package: one line, and the run goes on.
"""
from __future__ import annotations

from pathlib import Path


class TensorBoard:
    def __init__(self, run_dir: Path, targets: dict[str, float]):
        self.targets, self.writer = targets, None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's writer needs the tensorboard package
            print("note: --tensorboard needs the tensorboard package (pip install tensorboard); "
                  "this run goes on without it")
            return
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def epoch(self, row: dict) -> None:
        if self.writer is None:
            return
        step, w = row["epoch"], self.writer
        for key in ("lr", "images_per_s", "epoch_time_s"):
            w.add_scalar(key, row[key], step)
        w.add_scalar("loss/train", row["train_loss"], step)
        w.add_scalar("acc/train_running", row["train_acc_running"], step)
        for split in ("val", "test"):
            if f"{split}_acc" in row:
                w.add_scalar(f"acc/{split}", row[f"{split}_acc"], step)
                w.add_scalar(f"loss/{split}", row[f"{split}_loss"], step)
        for layer, h in row["entropy"].items():
            w.add_scalar(f"entropy/{layer}/probe", h, step)
            if layer in row.get("ses_entropy", {}):
                w.add_scalar(f"entropy/{layer}/penalised", row["ses_entropy"][layer], step)
            if layer in self.targets:
                w.add_scalar(f"entropy/{layer}/target", self.targets[layer], step)
        w.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
