"""What several test files share: the scripts, running them as real processes, a run that kills
itself at a fixed point, and reading a run's outputs without its timings."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXP10 = ROOT / "exp10_periodic_ses.py"
TIMING = {"epoch_time_s", "images_per_s", "overhead", "peak_mem_bytes"}
SMOKE_EXP10 = ("smoke", "exp10_periodic_ses")


def run(cmd, cwd=ROOT, timeout=600, env=None) -> subprocess.CompletedProcess:
    """python <cmd...> as a child process; its exit code, stdout and stderr."""
    return subprocess.run([sys.executable, *map(str, cmd)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def self_killing(tmp: Path, script: Path, epoch: int, signal_name: str = "SIGKILL") -> Path:
    """A copy of `script`'s experiment that sends itself `signal_name` when epoch `epoch` ends,
    after that epoch's evaluation and before its checkpoint (an epoch callback of rank 0): the
    last checkpoint is epoch - 1's. Its runs have the same folders and settings as the script's."""
    path = tmp / f"killed_at_epoch_{epoch}.py"
    path.write_text(f"""import os, runpy, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from harness.cli import run_experiment
exp = runpy.run_path({str(script)!r}, run_name="experiment")


def stop(model, data, run_dir, epoch, cfg):
    if epoch == {epoch}:
        os.kill(os.getpid(), signal.{signal_name})


sys.exit(run_experiment({str(script)!r}, exp["SETUP"], exp["GRID"], exp["__doc__"], sys.argv[1:],
                        epoch_callbacks=[stop]))
""")
    return path


def strip_timing(obj):
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def read_run(run_dir: Path):
    """(result.json, metrics.jsonl rows) without the wall-clock figures."""
    result = json.loads((run_dir / "result.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return strip_timing(result), strip_timing(metrics)


def copy_out_dir(src: Path, dest: Path) -> Path:
    """A private copy of a finished out-dir (a session fixture's) for a test that changes it."""
    shutil.copytree(src, dest)
    return dest


def descendants(pid: int) -> list[int]:
    """Every live process below pid (children, grandchildren, ...), from /proc."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    out, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        out += kids
        frontier = kids
    return out


def started_runs(output: str, experiment: str = "exp10_periodic_ses") -> list[str]:
    """The runs a sweep's output says it started training ('== <experiment> / <run> on ...')."""
    return [line.split(" / ")[1].split(" on ")[0] for line in output.splitlines()
            if line.startswith(f"== {experiment} / ")]


LEARNABLE = """import sys
sys.path.insert(0, {root!r})
from functools import partial
from data_utils import DATASETS, synthetic_dataset
from harness.cli import run_experiment
import exp10_periodic_ses as exp
info = dict(DATASETS["cifar100"], image_size={image_size}, sizes=({n_train}, {n_test}))
info["synthetic"] = partial(synthetic_dataset, info["num_classes"], {image_size})
setup = dict(exp.SETUP, epochs={epochs}, schedule_epochs={epochs}, milestones={milestones}, batch_size={batch_size})
sys.exit(run_experiment(exp.__file__, setup, exp.GRID, exp.__doc__, ["--synthetic", *sys.argv[1:]],
                        datasets={{"cifar100": info}}))
"""


def learnable_exp10(tmp: Path, n_train=2000, n_test=500, image_size=16, epochs=12, batch_size=64) -> Path:
    """A driver of exp10's grid on data_utils.synthetic_dataset: CIFAR-100's 100 classes, each a fixed
    low-frequency colour pattern plus noise (learnable), `n_train`/`n_test` images of `image_size`
    pixels, `epochs` epochs at `batch_size` (milestones at the paper's fractions of 60). Runs go to
    <out-dir>/synthetic/exp10_periodic_ses/ under the config's own names; extra arguments (seeds,
    out-dir, --device cpu) pass through."""
    milestones = [round(m * epochs / 60) for m in (25, 40, 52)]
    path = tmp / "exp10_learnable.py"
    path.write_text(LEARNABLE.format(root=str(ROOT), image_size=image_size, n_train=n_train, n_test=n_test,
                                     epochs=epochs, milestones=milestones, batch_size=batch_size))
    return path


def overlapping_texts(fig) -> list[tuple[str, str]]:
    """The pairs of texts a figure prints on top of each other: the boxes of every text drawn (tick
    labels, titles, axis labels, annotations, legend), compared pairwise with 1 px of slack. A text
    turned by other than a right angle is left out (its box is not its outline)."""
    import itertools
    from matplotlib.text import Text
    drawn, draw = [], Text.draw

    def record(self, renderer):
        draw(self, renderer)
        if self.get_visible() and self.get_text().strip() and self.get_rotation() % 90 == 0:
            drawn.append((self.get_text(), self.get_window_extent(renderer)))
    Text.draw = record
    try:
        fig.canvas.draw()
    finally:
        Text.draw = draw
    return [(a, b) for (a, p), (b, q) in itertools.combinations(drawn, 2)
            if p.x0 < q.x1 - 1 and q.x0 < p.x1 - 1 and p.y0 < q.y1 - 1 and q.y0 < p.y1 - 1]
