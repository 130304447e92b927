"""A results folder -> what the report can use of it, and one line per thing it had to leave out.

    experiments, skipped = read_results(root)

root holds <experiment>/<variant>_seed<N>/ run folders (the scripts' --out-dir, or its smoke/ or
synthetic/ part). Per experiment (a dict):
    runs       variant -> [result, ...] of its finished runs, by seed; a result is result.json
               with every number finite or None, its `variant` and `seed` those of the folder name
    curves     variant -> [[row, ...] per finished run]: metrics.jsonl, one row per epoch, in epoch
               order; its numbers finite or None (a periodic-SES epoch without an SES step has no
               `ses_entropy`)
    settings   variant -> the `config` object of a config.json of that variant ({} if none is readable)
    twin       variant -> the twin variant its Δ is taken against (result.json's `twin`, the folder the
               harness names; else result.json's or config.json's `baseline_config` under the same
               overrides: itself for the baseline, None where neither file says)
    ses        variant -> whether it trains with SES (config.json's `ses`, else SES steps in result.json)
    attention  run name -> the latest saved attention maps, of each variant's lowest seed
    status     run name -> finished | failed | unfinished | unreadable (every run folder)
    data       run name -> what the run trained on, real | synthetic | smoke (every run folder; data_kind)
    kind       None when the runs above trained on the real dataset, else "synthetic" or "smoke"
    set_aside  the finished results of another kind than `kind` (left out of runs, curves and attention)
    setting_labels   variant -> {setting: display label} its runs' result.json gives its overrides
    failed, unfinished   lines naming those runs (failed with stage and message)
One experiment's runs are of one kind, never averaged across kinds: of the kinds its finished runs
have, the most real (real, then synthetic, then smoke); a finished run of another kind is set aside
with one line. Nothing here raises on what a folder holds: a file that is missing, cut short, not JSON, or of the
wrong shape costs what depends on it, and `skipped` says so in one line per run.
"""
from __future__ import annotations

import json
from pathlib import Path

from reporting.labels import config_rank
from reporting.stats import number

RESULT_NUMBERS = ("acc", "rob", "gap", "train_acc", "val_acc", "overhead", "epoch_time_s", "images_per_s",
                  "peak_mem_bytes", "peak_mem_final_bytes", "device_mem_bytes", "ses_steps", "total_steps",
                  "epochs", "processes")
RESULT_MAPS = ("robustness", "entropy", "entropy_target", "entropy_max")
RESULT_TEXT = ("amp", "device", "ses_solver", "ses_target", "baseline_config", "config", "experiment")
ROW_NUMBERS = ("train_loss", "test_acc", "test_loss", "val_acc", "val_loss", "epoch_time_s", "images_per_s", "lr")
ROW_MAPS = ("entropy", "ses_entropy")
NOT_EXPERIMENTS = ("plots", "smoke", "synthetic")
KINDS = ("real", "synthetic", "smoke")  # what a run trained on, most real first


def load_json(path: Path) -> tuple[object, str | None]:
    """(the JSON in path, None) or (None, why not)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, f"{path.name} is missing"
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{path.name} cannot be read ({type(e).__name__})"
    try:
        return json.loads(text), None
    except ValueError:
        return None, f"{path.name} is cut short or not JSON"


def number_map(v) -> dict:
    return {str(k): number(x) for k, x in v.items()} if isinstance(v, dict) else {}


def clean_result(raw: dict, variant: str, seed: int) -> tuple[dict, list[str]]:
    """result.json with finite numbers or None, named by its folder; and what was wrong in it."""
    r = {k: number(raw.get(k)) for k in RESULT_NUMBERS}
    r.update({k: number_map(raw.get(k)) for k in RESULT_MAPS})
    r.update({k: raw[k] if isinstance(raw.get(k), str) else None for k in RESULT_TEXT})
    r.update(variant=variant, seed=seed, config=r["config"] or variant.split("+")[0])
    problems = [f"{k} is {'missing' if raw.get(k) is None else 'not a finite number'}" for k in ("acc", "rob", "gap")
                if r[k] is None]
    return r, problems


def data_kind(raw, cfg, exp_dir: Path) -> str:
    """What a run trained on: result.json's `data` where it says; else config.json (`smoke_sizes`:
    smoke; --smoke or --synthetic in its command line); else the folder the scripts write generated
    runs under (<out-dir>/smoke/, <out-dir>/synthetic/); else real."""
    said = raw.get("data") if isinstance(raw, dict) else None
    if said in KINDS:
        return said
    cfg = cfg if isinstance(cfg, dict) else {}
    if isinstance(cfg.get("config"), dict) and "smoke_sizes" in cfg["config"]:
        return "smoke"
    argv = cfg["environment"].get("argv") if isinstance(cfg.get("environment"), dict) else None
    for flag, kind in (("--smoke", "smoke"), ("--synthetic", "synthetic")):
        if isinstance(argv, list) and flag in argv:
            return kind
    parent = exp_dir.resolve().parent.name
    return parent if parent in KINDS else "real"


def labels_of(raw: dict) -> dict[str, str]:
    """result.json's `setting_labels` (setting -> display label), its text entries only."""
    given = raw.get("setting_labels")
    return {str(k): v for k, v in given.items() if isinstance(v, str)} if isinstance(given, dict) else {}


def read_metrics(path: Path) -> tuple[list[dict], str | None]:
    """metrics.jsonl's readable rows (by epoch) and, if some are not, what was lost."""
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return [], "metrics.jsonl is missing (no curves)"
    except (OSError, UnicodeDecodeError):
        return [], "metrics.jsonl cannot be read (no curves)"
    if not lines:
        return [], "metrics.jsonl is empty (no curves)"
    rows, bad = {}, 0
    for line in lines:
        try:
            raw = json.loads(line)
        except ValueError:
            raw = None
        epoch = raw.get("epoch") if isinstance(raw, dict) else None
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            bad += 1
            continue
        row = {k: number(raw.get(k)) for k in ROW_NUMBERS}
        row.update({k: number_map(raw[k]) for k in ROW_MAPS if isinstance(raw.get(k), dict)})
        rows[epoch] = dict(row, epoch=epoch)
    note = f"metrics.jsonl: {bad} of {len(lines)} lines unreadable" if bad else None
    return [rows[e] for e in sorted(rows)], note


def split_name(name: str) -> tuple[str, int] | None:
    variant, sep, seed = name.rpartition("_seed")
    return (variant, int(seed)) if sep and variant and seed.isdigit() else None


def read_experiment(exp_dir: Path, skipped: list[str]) -> dict:
    exp = dict(runs={}, curves={}, settings={}, twin={}, ses={}, attention={}, status={}, data={}, kind=None,
               set_aside=[], setting_labels={}, failed=[], unfinished=[])
    finished = []  # (where, result, curves, attention maps) of each finished run, in seed order
    folders = [p for p in exp_dir.iterdir() if p.is_dir() and "_seed" in p.name]
    for run_dir in sorted(folders, key=lambda p: split_name(p.name) or (p.name, -1)):  # seed 2 before seed 10
        where = f"{exp_dir.name}/{run_dir.name}"
        named = split_name(run_dir.name)
        if named is None:
            skipped.append(f"{where}: not a <config>_seed<N> folder name; skipped")
            continue
        variant, seed = named
        cfg, _ = load_json(run_dir / "config.json")
        settings = cfg.get("config") if isinstance(cfg, dict) and isinstance(cfg.get("config"), dict) else None
        if settings and not exp["settings"].get(variant):
            exp["settings"][variant] = settings
        twin = settings.get("baseline_config") if settings else None
        has_result = (run_dir / "result.json").exists()
        raw, why = load_json(run_dir / "result.json") if has_result else (None, None)
        exp["data"][run_dir.name] = data_kind(raw, cfg, exp_dir)
        if has_result and not isinstance(raw, dict):
            exp["status"][run_dir.name] = "unreadable"
            skipped.append(f"{where}: {why or 'result.json is not a JSON object'}; run left out")
            continue
        if not has_result:
            failure, why = load_json(run_dir / "failure.json")
            if (run_dir / "failure.json").exists():
                f = failure if isinstance(failure, dict) else {}
                text = " ".join(f"{f.get('stage', '?')}: {f.get('message', why or 'no message')}".split())
                exp["failed"].append(f"{run_dir.name} ({text})")
                exp["status"][run_dir.name] = "failed"
                skipped.append(f"{where}: failed ({text}); not averaged in")
            elif settings is not None:
                exp["unfinished"].append(run_dir.name)
                exp["status"][run_dir.name] = "unfinished"
                skipped.append(f"{where}: unfinished (no result.json yet); not averaged in")
            else:
                exp["status"][run_dir.name] = "unreadable"
                skipped.append(f"{where}: no result.json, failure.json or readable config.json; skipped")
            continue
        result, problems = clean_result(raw, variant, seed)
        if result["acc"] is None:
            exp["status"][run_dir.name] = "unreadable"
            skipped.append(f"{where}: result.json has no finite acc; run left out")
            continue
        exp["status"][run_dir.name] = "finished"
        result.update(data=exp["data"][run_dir.name], setting_labels=labels_of(raw))
        twin = result["baseline_config"] or twin
        if isinstance(raw.get("twin"), str):  # the harness names the twin's folder (an SES override leaves it alone)
            exp["twin"].setdefault(variant, raw["twin"])
        elif isinstance(twin, str):
            exp["twin"].setdefault(variant, variant.replace(result["config"], twin, 1))
        rows, note = read_metrics(run_dir / "metrics.jsonl")
        problems += [note] if note else []
        finished.append((where, result, rows, sorted((run_dir / "attention").glob("epoch_*.pt")), problems))
    kinds = {result["data"] for _, result, *_ in finished} or set(exp["data"].values())
    kind = next((k for k in KINDS if k in kinds), "real")
    exp["kind"] = None if kind == "real" else kind
    for where, result, rows, maps, problems in finished:
        variant = result["variant"]
        if result["data"] != kind:
            exp["set_aside"].append(result)
            skipped.append(f"{where}: trained on {result['data']} data, not averaged in with the {kind} runs")
            continue
        if problems:
            skipped.append(f"{where}: {'; '.join(problems)} (left out of what needs it)")
        exp["runs"].setdefault(variant, []).append(result)
        exp["setting_labels"].setdefault(variant, {}).update(result["setting_labels"])
        if rows:
            exp["curves"].setdefault(variant, []).append(rows)
        if maps and not any(split_name(r)[0] == variant for r in exp["attention"]):
            exp["attention"][where.split("/", 1)[1]] = maps[-1]
    for variant, results in exp["runs"].items():
        exp["twin"].setdefault(variant, None)
        flag = exp["settings"].get(variant, {}).get("ses")
        exp["ses"][variant] = flag if isinstance(flag, bool) else any((r["ses_steps"] or 0) > 0 for r in results)
    order = config_order(exp_dir, list(exp["runs"]), exp["twin"])
    exp["runs"] = {v: exp["runs"][v] for v in order}
    exp["curves"] = {v: exp["curves"][v] for v in order if v in exp["curves"]}
    return exp


def config_order(exp_dir: Path, variants: list[str], twin: dict) -> list[str]:
    """The grid order recorded in summary.json where it is readable (a killed session may not have
    written it); the rest baseline first, then each config without SES followed by its SES configs,
    each in the label table's order (labels.config_rank: k=3 before k=10)."""
    summary, _ = load_json(exp_dir / "summary.json")
    listed = summary.get("runs") if isinstance(summary, dict) and isinstance(summary.get("runs"), list) else []
    names = [r.get("variant") or r.get("config") for r in listed if isinstance(r, dict)]
    ranked = list(dict.fromkeys(n for n in names if n in variants))
    rest = [v for v in variants if v not in ranked]
    roots = sorted({twin.get(v) if twin.get(v) in rest else v for v in rest},
                   key=lambda v: (v != "baseline", config_rank(v)))
    for root in roots:
        ranked += [root] if root in rest else []
        ranked += sorted((v for v in rest if v != root and twin.get(v) == root), key=config_rank)
    return ranked + [v for v in rest if v not in ranked]


def read_results(root: Path) -> tuple[dict[str, dict], list[str]]:
    """experiment -> its dict (above), for every experiment folder with at least one run folder."""
    experiments, skipped = {}, []
    for exp_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in NOT_EXPERIMENTS):
        exp = read_experiment(exp_dir, skipped)
        if exp["status"]:
            experiments[exp_dir.name] = exp
    return experiments, skipped
