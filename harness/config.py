"""A run's settings: how a run's config is resolved, and the run's name.

Resolution, later entries winning:  the table's defaults (harness/settings.py, plus a script's own
entries) < the script's SETUP < the grid's config < smoke sizes (--smoke only) < command-line overrides.
The run's name is `<config>_seed<N>`. A command-line setting that is part of the run's identity and
differs from what the config itself would use is an override, and names the run (`--every 3` on
`ses_k1`: `ses_k1+every=3_seed0`). An SES setting does not apply to a config without SES (applies): the
baseline keeps its name and its finished runs. So one folder holds one setting, and the report never
files a k=3 run under k=1. A resolved config holds every setting plus the run's facts (RUN_FACTS).
"""
from __future__ import annotations

import hashlib
import json
import re

from harness.settings import SETTINGS
from harness.table import Table

DEFAULTS = SETTINGS.defaults()
RUN_FACTS = ("experiment", "config", "seed", "overrides", "variant", "smoke_sizes")  # keys that are no setting
# --smoke: the same code path on tiny generated data (n_train / n_test samples, two steps an epoch);
# a script's SETUP["smoke"] may shrink further (the generated images' size, model widths), never the
# code path.
SMOKE = dict(epochs=2, batch_size=8, eval_batch_size=8, attack_batch_size=8, n_train=16, n_test=8, image_size=16)
SIZE_KEYS = ("n_train", "n_test", "image_size")  # of the generated data, not settings of the run


def smoke_settings(setup: dict) -> dict:
    """The settings --smoke puts over a config, plus `smoke_sizes` (n_train, n_test, image_size)."""
    sizes = {**SMOKE, **setup.get("smoke", {})}
    return dict({k: v for k, v in sizes.items() if k not in SIZE_KEYS}, smoke_sizes=sizes)


def resolve_config(experiment: str, setup: dict, grid: dict, config: str, seed: int,
                   smoke: bool, overrides: dict, table: Table = SETTINGS) -> tuple[dict, dict]:
    """(cfg, changed): the run's effective settings, and the overrides of identity settings that
    change the config (those name the run)."""
    own = {**table.defaults(), **{k: v for k, v in setup.items() if k != "smoke"}, **grid[config],
           **(smoke_settings(setup) if smoke else {})}
    overrides = {k: v for k, v in overrides.items() if applies(table, k, own)}
    cfg = {**own, **overrides, "experiment": experiment, "config": config, "seed": seed}
    changed = {k: v for k, v in overrides.items()
               if table.identity(k) and json.dumps(own.get(k)) != json.dumps(v)}
    cfg["overrides"] = changed
    cfg["variant"] = variant_name(config, changed)
    return cfg, changed


def twin_variant(experiment: str, setup: dict, grid: dict, cfg: dict, smoke: bool, overrides: dict,
                 table: Table = SETTINGS) -> str | None:
    """The folder name (variant) of the run `cfg` is compared with: its `baseline_config` under the same
    command-line overrides, as far as they apply to it (`ses_k1+every=3` -> `baseline`); None when the
    config is its own twin or the grid has no such config. result.json records it as `twin`."""
    twin = cfg.get("baseline_config")
    if twin == cfg["config"] or twin not in grid:
        return None
    return resolve_config(experiment, setup, grid, twin, cfg["seed"], smoke, overrides, table)[0]["variant"]


def applies(table: Table, key: str, own: dict) -> bool:
    """Whether a command-line setting applies to a config with settings `own`: an SES setting (to="SES":
    --lam, --every, ...) changes only the configs that use SES; a baseline keeps its own, its name and
    its finished runs."""
    return bool(own.get("ses")) or key not in table or table[key].to != "SES"


def variant_name(config: str, changed: dict) -> str:
    """`config`, or `config+key=value+...` for overrides (sorted; other characters than [A-Za-z0-9.,=_+-] -> _)."""
    if not changed:
        return config
    parts = [f"{k}={v if not isinstance(v, (list, dict)) else json.dumps(v)}" for k, v in sorted(changed.items())]
    name = config + "".join("+" + re.sub(r"[^A-Za-z0-9.,=_+-]", "_", p) for p in parts)
    if len(name) > 120:  # keep folder names short: a hash of the full settings keeps them distinct
        name = name[:100] + "+" + hashlib.sha1(name.encode()).hexdigest()[:10]
    return name


def run_name(cfg: dict) -> str:
    return f"{cfg['variant']}_seed{cfg['seed']}"
