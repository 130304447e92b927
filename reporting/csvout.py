"""runs.csv: one row per run folder, tidy, for pandas (`pandas.read_csv("runs.csv")` as it is).

Columns: experiment, variant, config, seed, status (finished | failed | unfinished | unreadable), twin
(the variant its Δ is taken against; empty for a config that is its own), kind (what the run trained on:
smoke | synthetic | empty for real data; a finished run of another kind than its experiment's is in the
CSV, not in the tables); then every metric of a finished run's result.json as recorded (fractions, not
percent): acc, rob, gap, train_acc, val_acc, overhead, epoch_time_s, images_per_s, peak_mem_bytes,
peak_mem_final_bytes, device_mem_bytes, ses_steps, total_steps, epochs, one `robustness.<key>` column
per perturbation and one `entropy.<layer>` column per hooked layer (final H, nats); then how it ran:
device, precision (result.json's amp), processes, route (the SES eigen-solver route, `ses_solver`). An
empty cell is a value the run does not have. Header once, comma-separated, RFC 4180 quoting (csv module).
"""
from __future__ import annotations

import csv
import io

from reporting.read import RESULT_NUMBERS
from reporting.labels import robustness_order

HEAD = ("experiment", "variant", "config", "seed", "status", "twin", "kind")
TAIL = (("device", "device"), ("precision", "amp"), ("processes", "processes"), ("route", "ses_solver"))


def cell(v) -> str:
    if v is None:
        return ""
    return f"{v:g}" if isinstance(v, float) and v.is_integer() and abs(v) < 1e15 else str(v)


def runs_csv(experiments: dict) -> str:
    """The CSV text of every run folder of every experiment."""
    results = {(exp, r["variant"], r["seed"]): r for exp, e in experiments.items()
               for r in [r for rs in e["runs"].values() for r in rs] + e["set_aside"]}
    suite = robustness_order(k for r in results.values() for k in r["robustness"])
    layers = list(dict.fromkeys(k for r in results.values() for k in r["entropy"]))
    metrics = [m for m in RESULT_NUMBERS if m != "processes"]
    columns = list(HEAD) + metrics + [f"robustness.{k}" for k in suite] + [f"entropy.{k}" for k in layers]
    columns += [c for c, _ in TAIL]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for exp, e in experiments.items():
        order = {v: i for i, v in enumerate(e["runs"])}
        names = sorted(e["status"], key=lambda n: (order.get(n.rpartition("_seed")[0], len(order)), n.rpartition("_seed")[0],
                                                   int(n.rpartition("_seed")[2])))
        for name in names:
            status = e["status"][name]
            variant, _, seed = name.rpartition("_seed")
            r = results.get((exp, variant, int(seed)), {})
            twin = e["twin"].get(variant)
            twin = twin if twin != variant else None  # a baseline is compared with nothing
            kind = e["data"].get(name)
            row = [exp, variant, r.get("config") or variant.split("+")[0], seed, status, twin,
                   None if kind == "real" else kind]
            row += [r.get(m) for m in metrics] + [r.get("robustness", {}).get(k) for k in suite]
            row += [r.get("entropy", {}).get(k) for k in layers] + [r.get(key) for _, key in TAIL]
            w.writerow([cell(v) for v in row])
    return buf.getvalue()
