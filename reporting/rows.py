"""What the tables, macros and figures print, computed once per experiment from reporting.read's dict.

summarize(exp, reference) -> one row per variant (grid order):
    variant, config, twin (the variant its Δ is taken against, present in the folder, else None), n
    (finished runs), seeds, ses (whether it trains with SES); acc, rob, gap and robustness[key] as Spread(mean, std, n) in percent
    (gap in percentage points); d_acc, d_rob: Delta of the per-seed differences against the twin in
    percentage points (reporting.stats.paired); overhead: (median, min, max, n) over seeds of
    overheads(): epoch_time / the same seed's twin's - 1; setting: how the runs
    ran ('fp16 on Tesla T4'); mixed / pair_mixed: where the runs, or the seed pairs, ran
    differently; every: the SES period k of an SES config; input: "image" or "points" (its dataset's
    kind of input, reporting.labels.input_kind); paper: the paper's figures for a real run whose settings
    are the config's own (never for smoke or synthetic results: exp["kind"]).
interactions(rows) -> where an experiment has a plain SES pair (twin `baseline`) and other pairs
    (exp12's Mixup/CutMix), per other pair: SES's gain with that augmentation (its d_acc, d_rob)
    and the interaction: per seed (X_ses - X) - (ses - baseline), paired over the seeds all four
    runs have, as a Delta in percentage points.
"""
from __future__ import annotations

from reporting.labels import METRICS, input_kind, robustness_order
from reporting.stats import mean_std, median_range, paired


def pct(results: list[dict], get) -> dict:
    """seed -> 100 * get(result), for the results with a value."""
    return {r["seed"]: 100 * v for r in results if (v := get(r)) is not None}


def setting(r: dict) -> str:
    """How a run ran: precision, device, process count (runs of several machines can meet in one folder)."""
    procs = r.get("processes") or 1
    return f"{r.get('amp') or '?'} on {r.get('device') or '?'}" + (f" x{procs:g} processes" if procs > 1 else "")


def mix_of(results: list[dict]) -> str | None:
    """'bf16 on NVIDIA L40S (2), fp16 on Tesla T4 (1)' when the runs ran differently, else None."""
    counts: dict[str, int] = {}
    for r in results:
        counts[setting(r)] = counts.get(setting(r), 0) + 1
    return ", ".join(f"{k} ({v})" for k, v in sorted(counts.items())) if len(counts) > 1 else None


def pair_mix(results: list[dict], twin: list[dict]) -> str | None:
    """Where a config's runs and its twin's, seed by seed, ran differently: 'seed 0: fp16 on T4 vs bf16 on L40S'."""
    by_seed = {r["seed"]: r for r in twin}
    diffs = [f"seed {r['seed']}: {setting(r)} vs {setting(by_seed[r['seed']])}" for r in results
             if r["seed"] in by_seed and setting(r) != setting(by_seed[r["seed"]])]
    return "; ".join(diffs) or None


def overheads(results: list[dict], twin: list[dict] | None) -> list[float | None]:
    """Per seed, epoch_time_s / the same seed's twin's - 1 where both ran alike (same device, precision
    and process count: setting()); none where they did not; where the twin has no run of that seed
    here, the run's result.json `overhead` (written when its twin had finished before it)."""
    by_seed = {t["seed"]: t for t in twin or []}
    out = []
    for r in results:
        t = by_seed.get(r["seed"])
        if t is None:
            out.append(r["overhead"])
        elif setting(r) == setting(t) and r["epoch_time_s"] and (t["epoch_time_s"] or 0) > 0:
            out.append(r["epoch_time_s"] / t["epoch_time_s"] - 1)
    return out


def summarize(exp: dict, reference: dict) -> list[dict]:
    rows = []
    runs = exp["runs"]
    for variant, results in runs.items():
        twin = exp["twin"].get(variant)
        twin_runs = runs.get(twin) if twin and twin != variant else None
        row = dict(variant=variant, config=results[0]["config"], twin=twin if twin_runs else None, n=len(results),
                   seeds=[r["seed"] for r in results])
        for m, _ in METRICS:
            row[m] = mean_std(pct(results, lambda r: r[m]).values())
        keys = robustness_order(k for r in results for k in r["robustness"])
        row["robustness"] = {k: mean_std(pct(results, lambda r: r["robustness"].get(k)).values()) for k in keys}
        for m in ("acc", "rob"):
            row[f"d_{m}"] = (paired(pct(results, lambda r: r[m]), pct(twin_runs, lambda r: r[m]))
                             if twin_runs else None)
        row["overhead"] = median_range(overheads(results, twin_runs))
        row["setting"] = ", ".join(sorted({setting(r) for r in results}))
        row["mixed"] = mix_of(results)
        row["pair_mixed"] = pair_mix(results, twin_runs) if twin_runs else None
        row["ses"] = exp["ses"].get(variant, False)
        row["input"] = input_kind(exp["settings"].get(variant, {}).get("dataset"))
        every = exp["settings"].get(variant, {}).get("every")
        row["every"] = every if isinstance(every, int) and not isinstance(every, bool) and row["ses"] else None
        paper = reference.get(row["config"]) if exp["kind"] is None and variant == row["config"] else None
        row["paper"] = paper if isinstance(paper, dict) else None
        rows.append(row)
    return rows


def gains(results: list[dict], twin_runs: list[dict], m: str) -> dict:
    """seed -> 100 * (result - twin's result) of metric m."""
    twin = pct(twin_runs, lambda r: r[m])
    return {s: v - twin[s] for s, v in pct(results, lambda r: r[m]).items() if s in twin}


def interactions(exp: dict, rows: list[dict]) -> list[dict]:
    pairs = [r for r in rows if r["twin"] and r["ses"]]
    plain = [r for r in pairs if r["twin"].split("+")[0] == "baseline"]
    ref = next((r for r in plain if r["config"] == "ses"), plain[0] if plain else None)
    others = [r for r in pairs if ref and r["twin"] != ref["twin"]]
    if not others:
        return []
    out = [dict(row=ref, twin=ref["twin"], interaction_acc=None, interaction_rob=None)]
    for r in others:
        item = dict(row=r, twin=r["twin"])
        for m in ("acc", "rob"):
            with_mix = gains(exp["runs"][r["variant"]], exp["runs"][r["twin"]], m)
            alone = gains(exp["runs"][ref["variant"]], exp["runs"][ref["twin"]], m)
            item[f"interaction_{m}"] = paired(with_mix, alone)
        out.append(item)
    return out


def paper_delta(rows: list[dict], row: dict, m: str) -> float | None:
    """The paper's own Δ of a row against its twin (both paper figures), in percentage points."""
    twin = next((r for r in rows if r["variant"] == row["twin"]), None)
    if not (row["paper"] and twin and twin["paper"]):
        return None
    try:
        return float(row["paper"][m]) - float(twin["paper"][m])
    except (KeyError, TypeError, ValueError):
        return None

