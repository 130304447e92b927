"""The report's one label table: how each experiment, config and metric is named in print, and how
each config is drawn.

- `EXPERIMENTS`: experiment id -> (short name, caption sentence, plain text).
- `CONFIGS`: config id -> display name. A config `<x>_ses` not listed is "<name of x> + SES"
  (`mixup_ses` -> "Mixup + SES"); a run whose settings were overridden on the command line
  (`ses_k1+every=3`) shows each override as a change, "SES k=1 (k→3)", each setting by its label:
  the one the run's own result.json gives (`setting_labels`, from the settings table the run used,
  a script's own entries included), else the harness's table of run settings (harness/settings.py),
  else its name; report.py hands both over (`use_setting_labels`). An unknown id is shown as it is.
- `input_kind`: a dataset's kind of input, "image" or "points" (report.py hands the datasets'
  entries over: `use_input_kinds`); what the robustness suite perturbs depends on it.
- `METRICS`: the headline metrics (key in result.json, column title); `robustness_label` names a
  key of result.json's robustness suite (`gauss_0.05` -> "σ=0.05", `fgsm_1/255` -> "FGSM 1/255").
- `styles`: variant -> Style(colour, linestyle, marker). An SES config and its twin share a colour,
  the SES config solid and the twin dashed; where several SES configs share one twin (exp10's k
  values) the twin is black dashed and each SES config has its own colour; no two variants of an
  experiment get the same (colour, linestyle, marker).
"""
from __future__ import annotations

import re
from typing import NamedTuple

from reporting.latex import to_tex

EXPERIMENTS = {
    "exp10_periodic_ses": ("Exp 10", "Periodic SES on CIFAR-100 (ResNet-18): SES applied every k-th step."),
    "exp11_resnet50_tinyimagenet": ("Exp 11", "ResNet-50 on Tiny-ImageNet: baseline vs. SES on layer4 + avgpool."),
    "exp12_mixup_cutmix_cifar100": ("Exp 12", "SES combined with Mixup and CutMix on CIFAR-100 (ResNet-18)."),
    "exp13_perceiver": ("Exp 13", "Perceiver on CIFAR-10 and ModelNet40, with and without SES on the latents."),
}
CONFIGS = {
    "baseline": "Baseline", "ses": "SES", "ses_k1": "SES k=1", "ses_k3": "SES k=3", "ses_k5": "SES k=5",
    "ses_k10": "SES k=10", "mixup": "Mixup", "cutmix": "CutMix",
    "cifar10_fourier": "CIFAR-10 Fourier", "cifar10_permuted_learned": "CIFAR-10 permuted", "modelnet40_fourier": "ModelNet40",
}
METRICS = (("acc", "Acc (%)"), ("rob", "Rob (%)"), ("gap", "Gap (pp)"))
KIND_NOTE = {"smoke": "SMOKE RESULTS: tiny generated data, 2 epochs; they test the pipeline and say nothing about SES.",
             "synthetic": "SYNTHETIC RESULTS: generated data, not the real dataset; not paper numbers."}
# Okabe-Ito colours (distinct under the common colour-vision deficiencies and in greyscale by marker)
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#882255", "#999933")
TWIN_OF_MANY = "#000000"
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p")


class Style(NamedTuple):
    colour: str
    linestyle: str
    marker: str


def experiment_name(exp: str) -> str:
    return EXPERIMENTS.get(exp, (exp, ""))[0]


def experiment_caption(exp: str) -> str:
    return EXPERIMENTS.get(exp, ("", ""))[1]


def config_name(config: str) -> str:
    if config in CONFIGS:
        return CONFIGS[config]
    if config.endswith("_ses") and config[:-4] in CONFIGS:
        return CONFIGS[config[:-4]] + " + SES"
    return config


def config_rank(variant: str) -> tuple:
    """Where a run's config goes when no grid order is recorded: the label table's order (CONFIGS) of
    its config, then its name with numbers compared by value (ses_k3 before ses_k10)."""
    config = variant.split("+")[0]
    config = config if config in CONFIGS else config.removesuffix("_ses")
    known = list(CONFIGS)
    return (known.index(config) if config in CONFIGS else len(known),
            [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", variant)])


_SETTING_LABELS: dict[str, str] = {}          # run setting -> its display label ("lam" -> "λ")
_RUN_LABELS: dict[str, dict[str, str]] = {}   # variant -> the labels its runs' result.json gives
_INPUT_KINDS: dict[str, str] = {}             # dataset -> "image" | "points"


def use_setting_labels(table: dict[str, str], runs: dict[str, dict[str, str]] | None = None) -> None:
    """The display labels of the run settings: the harness's table (setting -> label) and the runs'
    own (variant -> {setting -> label}), which come first. Replaces what was handed over before."""
    _SETTING_LABELS.clear()
    _SETTING_LABELS.update(table)
    _RUN_LABELS.clear()
    _RUN_LABELS.update(runs or {})


def use_input_kinds(kinds: dict[str, str]) -> None:
    """dataset -> "image" | "points" (report.py hands over the datasets' entries)."""
    _INPUT_KINDS.clear()
    _INPUT_KINDS.update(kinds)


def input_kind(dataset) -> str:
    """A dataset's kind of input: "points" for a point-cloud dataset, else "image"."""
    return "points" if _INPUT_KINDS.get(dataset) == "points" else "image"


def display(variant: str) -> str:
    """'ses_k1' -> 'SES k=1'; 'ses_k1+every=3+lam=0.1' -> 'SES k=1 (k→3, λ→0.1)' (the settings' labels)."""
    config, *overrides = variant.split("+")
    own = _RUN_LABELS.get(variant, {})
    shown = []
    for override in overrides:
        key, eq, value = override.partition("=")
        shown.append(f"{own.get(key) or _SETTING_LABELS.get(key, key)}→{value}" if eq else override)
    return config_name(config) + (f" ({', '.join(shown)})" if shown else "")


def display_tex(variant: str) -> str:
    """The display name for LaTeX: special characters escaped, 'k=3' as math."""
    return re.sub(r"\bk=(\d+)", r"$k{=}\1$", to_tex(display(variant)))


def robustness_label(key: str) -> str:
    """'gauss_0.05' -> 'σ=0.05', 'fgsm_2/255' -> 'FGSM 2/255'; another key as it is."""
    kind, _, level = key.partition("_")
    return {"gauss": f"σ={level}", "fgsm": f"FGSM {level}"}.get(kind, key)


def robustness_order(keys) -> list[str]:
    """Gaussian noise by sigma, then FGSM by epsilon, then anything else by name."""
    def rank(key):
        kind, _, level = key.partition("_")
        try:
            value = float(level.split("/")[0]) / (float(level.split("/")[1]) if "/" in level else 1)
        except (ValueError, ZeroDivisionError):
            return (2, 0.0, key)
        return ({"gauss": 0, "fgsm": 1}.get(kind, 2), value, key)
    return sorted(set(keys), key=rank)


def styles(order: list[str], twin: dict[str, str | None], ses: dict[str, bool]) -> dict[str, Style]:
    """variant -> Style for the variants in `order`; twin[v] is v's twin variant, ses[v] whether
    v trains with SES (only an SES config shares its twin's colour)."""
    members: dict[str, list[str]] = {}
    for v in order:
        t = twin.get(v)
        if ses.get(v) and t and t != v and t in order:
            members.setdefault(t, []).append(v)
    out: dict[str, Style] = {}
    colours = iter(PALETTE * (1 + len(order) // len(PALETTE)))
    for v in order:
        t = twin.get(v)
        root = t if ses.get(v) and t and t != v and t in order else v  # a family is drawn when its first member comes
        if root in out or v in out:
            continue
        kids = members.get(root, [])
        if len(kids) == 1:      # a pair: one colour, the twin dashed
            c = next(colours)
            out[root], out[kids[0]] = Style(c, "--", ""), Style(c, "-", "")
        elif kids:              # one twin, several SES configs
            out[root] = Style(TWIN_OF_MANY, "--", "")
            for m in kids:
                out[m] = Style(next(colours), "-", "")
        else:                  # alone: solid if it is an SES config (its twin absent), else dashed
            out[v] = Style(next(colours), "-" if ses.get(v) else "--", "")
    return {v: Style(s.colour, s.linestyle, MARKERS[i % len(MARKERS)]) for i, (v, s) in
            enumerate((v, out[v]) for v in order)}
