"""The table of run settings (harness/settings.py): every setting flag any script's parser accepts reaches
the run's config and, when it is part of the run's identity, its folder name; a bad value or an unknown key
in a grid is one line; a run stored before a setting existed resumes at its default; no list of setting
keys is typed in harness/ and no choice list twice; and a researcher adds an SES option in two files."""
import argparse
import ast
import importlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from harness import cli, sweep
from harness.config import run_name
from harness.models import resolve_layers
from harness.settings import SETTINGS
from harness.table import Kind, Setting, Table, number, numbers
from helpers import EXP10, ROOT, run
from test_layout import FLOORS

SCRIPTS = sorted(p.stem for p in ROOT.glob("exp*.py"))


def captured(monkeypatch, module, argv: list) -> dict:
    """module.main(argv) in this process up to its runs: the parser it built, the registry and the
    resolved config of every run the sweep hands to run_one (which writes it as config.json's `config`)."""
    seen: dict = {"cfgs": []}
    real_build = cli.build_parser

    def build_parser(*args, **kwargs):
        seen["parser"] = real_build(*args, **kwargs)
        return seen["parser"]

    def run_one(cfg, exp_dir, args, reg, *rest, **kwargs):
        seen["cfgs"].append(cfg)
        seen["reg"] = reg
        return "skipped"
    monkeypatch.setattr(cli, "build_parser", build_parser)
    monkeypatch.setattr(sweep, "run_one", run_one)
    assert module.main([str(a) for a in argv]) == 0
    return seen


def other_value(setting, own, cfg: dict, reg):
    """A value of `setting` other than `own` that its check accepts, chosen by its kind."""
    names = setting.choices(reg)
    if names is not None:
        return next(n for n in names if n != own)
    if setting.kind.item is not None:  # a list: one more item, its last repeated
        return list(own) + [own[-1]] if own else [1]
    if setting.kind.parse is None:  # true / false
        return not own
    if setting.kind.parse is int:
        return (own or 0) + 1
    if setting.kind.parse is float:
        return own / 2 if own else 1.0
    with torch.device("meta"):  # text: the hooked layers; the first module the config's own preset hooks
        model = reg.models[cfg["model"]](cfg, dict(reg.datasets[cfg["dataset"]]))
    return resolve_layers(cfg, model, reg.presets)[0]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_setting_flag_the_parser_accepts_reaches_config_json_and_identity_ones_the_folder_name(
        script, tmp_path, monkeypatch):
    module = importlib.import_module(script)
    config = next(c for c, v in module.GRID.items() if v.get("ses"))
    base = ["--smoke", "--configs", config, "--out-dir", tmp_path]
    first = captured(monkeypatch, module, base)
    parser, reg, (plain,) = first["parser"], first["reg"], first["cfgs"]
    assert run_name(plain) == f"{config}_seed0"
    flags = [a for a in parser._actions if a.dest in reg.settings and reg.settings[a.dest].flag]
    outside = [a.option_strings[0] for a in parser._actions if a.dest in plain and a not in flags]
    assert not outside, f"flags named like a run setting that the table does not make (parsed, then dropped): {outside}"
    harness = "\n".join(p.read_text() for p in sorted((ROOT / "harness").glob("*.py")))
    unread = [a.option_strings[0] for a in parser._actions if a not in flags and a.dest != "help"
              and not re.search(rf"\bargs\.{a.dest}\b|getattr\(args, \"{a.dest}\"", harness)]
    assert not unread, f"options the table does not make and the harness never reads (parsed, then dropped): {unread}"
    assert {a.dest for a in flags} == {s.name for s in reg.settings.flags()} and len(flags) >= 10
    for action in flags:
        setting = reg.settings[action.dest]
        value = other_value(setting, plain[action.dest], plain, reg)
        if setting.kind.item is not None:
            given = [action.option_strings[0], *value]
        elif setting.kind.parse is None:
            given = [action.option_strings[0 if value else 1]]
        else:
            given = [action.option_strings[0], value]
        (cfg,) = captured(monkeypatch, module, base + given)["cfgs"]
        assert json.dumps(cfg[action.dest]) == json.dumps(value), (given, cfg[action.dest])
        name = run_name(cfg)
        if setting.identity:
            assert cfg["overrides"] == {action.dest: value} and f"+{action.dest}=" in name, (given, name)
        else:  # a chunk size: the same run, named as before
            assert cfg["overrides"] == {} and name == run_name(plain), (given, name)


def test_an_optional_setting_can_be_turned_off_from_the_command_line(tmp_path, monkeypatch):
    """exp13 clips gradients at 10; --clip-grad none turns that off (a run of its own)."""
    module = importlib.import_module("exp13_perceiver")
    (cfg,) = captured(monkeypatch, module, ["--smoke", "--configs", "cifar10_fourier", "--clip-grad", "none",
                                            "--out-dir", tmp_path])["cfgs"]
    assert module.SETUP["clip_grad"] is not None and cfg["clip_grad"] is None and cfg["overrides"] == {"clip_grad": None}


def test_an_ses_setting_on_the_command_line_leaves_the_configs_without_ses_alone(tmp_path, monkeypatch, capsys):
    """--lam / --every change the SES configs only: the baseline keeps its settings, its name and so its
    finished runs (it would otherwise be trained again as baseline+lam=...), and a note says so."""
    module = importlib.import_module("exp10_periodic_ses")
    seen = captured(monkeypatch, module, ["--smoke", "--configs", "baseline", "ses_k3", "--lam", "0.05",
                                          "--every", "2", "--out-dir", tmp_path])
    baseline, ses = seen["cfgs"]
    assert run_name(baseline) == "baseline_seed0" and baseline["lam"] == SETTINGS["lam"].default
    assert run_name(ses) == "ses_k3+every=2+lam=0.05_seed0" and (ses["lam"], ses["every"]) == (0.05, 2)
    assert "note: --lam 0.05 applies to the SES configs only; baseline keeps its own" in capsys.readouterr().out


def test_an_ses_override_is_compared_with_the_baseline_it_left_alone(tmp_path):
    """ses_k1 with --every 3 is compared with the plain baseline (its twin, which --every does not
    change): result.json names that twin, the overhead is taken against it, and the report's Δ too."""
    p = run([EXP10, "--smoke", "--configs", "baseline", "ses_k1", "--every", "3", "--out-dir", tmp_path], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    exp = tmp_path / "smoke" / "exp10_periodic_ses"
    result = json.loads((exp / "ses_k1+every=3_seed0" / "result.json").read_text())
    assert result["twin"] == "baseline" and (exp / "baseline_seed0" / "result.json").is_file()
    assert "overhead" in result
    import report
    assert report.main([str(tmp_path / "smoke"), "--no-figures"]) == 0
    row = next(line for line in (tmp_path / "smoke" / "report.md").read_text().splitlines()
               if line.startswith("| ses_k1+every=3 |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[2] == "Baseline" and cells[7] != "—"  # vs, Δ acc


@pytest.mark.parametrize("grid,says", [
    ({"ses": dict(ses=True, every=0)}, "config 'ses': every (the SES period k) must be an integer >= 1, got 0"),
    ({"ses": dict(ses=True, beta=1.5)}, "config 'ses': beta must be in the open interval (0, 1), got 1.5"),
    ({"ses": dict(ses=True, evrey=3)}, "config 'ses': unknown setting 'evrey' (did you mean every?)"),
    ({"ses": dict(ses=True, mix="mixop")}, "config 'ses': mix must be one of none, mixup, cutmix, got 'mixop'"),
    ({"ses": dict(ses=True, model="resnet81")}, "config 'ses': model must be one of"),
    ({"ses": dict(ses=True, layers="alll")}, "config 'ses': unknown layer name 'alll'; presets for resnet18: all"),
    ({"ses": dict(ses=True, baseline_config="baselin")}, "config 'ses': baseline_config 'baselin' is no config"),
    ({"ses": dict(ses=True, rob_sigma=0.2)}, "config 'ses': rob_sigma 0.2 (the headline rob) is none of noise_sigmas"),
])
def test_a_bad_value_or_an_unknown_key_in_a_grid_is_one_line_and_exit_2(grid, says, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run_experiment(str(EXP10), dict(dataset="cifar10"), grid, "doc", ["--smoke", "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and says in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_list_setting_is_a_flag_of_one_or_more_values_each_checked():
    """A per-layer weight is a list; its flag takes one or more values, and a bad one is one line."""
    table = Table([Setting("ses_weights", [1.0], numbers(0), "per-layer SES weights", flag=True, to="SES")])
    parser = argparse.ArgumentParser()
    table.add_flags(parser)
    assert parser.parse_args(["--ses-weights", "1", "0.5"]).ses_weights == [1.0, 0.5]
    assert not hasattr(parser.parse_args([]), "ses_weights")  # absent unless given: the config keeps its own
    item = next(a for a in parser._actions if a.dest == "ses_weights").type  # what argparse calls per value
    with pytest.raises(argparse.ArgumentTypeError, match="ses_weights must be a finite number >= 0, got -1.0"):
        item("-1")


def test_a_setting_is_refused_when_it_names_no_reader_or_its_flag_cannot_be_parsed():
    with pytest.raises(ValueError, match="to=.ses. names no reader; give to= one of SES, "):
        Setting("margin", 0.0, number(), "dead zone", flag=True, to="ses")
    bare = Kind("a set of layers", lambda v: isinstance(v, set))
    with pytest.raises(ValueError, match="a flag of a set of layers cannot be parsed from the command line"):
        Setting("layer_set", set(), bare, "layers", flag=True, to="hooks")
    Setting("layer_set", set(), bare, "layers", to="hooks")  # without a flag it is fine


def test_a_run_stored_before_a_setting_existed_resumes_at_its_default_and_chunk_sizes_may_change(tmp_path):
    from harness.config import resolve_config
    cfg, _ = resolve_config("e", {}, {"ses": dict(ses=True)}, "ses", 0, False, {})
    stored = {k: v for k, v in cfg.items() if k != "step_size"}  # a stored config that lacks step_size
    (tmp_path / "config.json").write_text(json.dumps(dict(config=dict(stored, eval_batch_size=7))))
    sweep.check_same_settings(tmp_path, cfg)  # step_size at its default, another chunk size: the same run
    with pytest.raises(sweep.RunError, match=rf"step_size: {SETTINGS['step_size'].default} there, 20 now"):
        sweep.check_same_settings(tmp_path, dict(cfg, step_size=20))


def _literals(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)) and len(node.elts) >= 2 and \
                all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
            yield node.lineno, [e.value for e in node.elts]


def test_no_list_of_setting_keys_in_the_harness_and_no_choice_list_typed_twice():
    """A literal naming two or more settings (whatever else it holds) is a hand-kept key list."""
    names = set(SETTINGS)
    keys = [f"{p.name}:{line}" for p in sorted((ROOT / "harness").glob("*.py"))
            for line, values in _literals(ast.parse(p.read_text())) if len(set(values) & names) >= 2]
    assert not keys, f"setting keys typed out (take them from the table): {keys}"
    files = [p for unit in FLOORS for p in ([ROOT / f"{unit}.py"] if (ROOT / f"{unit}.py").is_file()
                                             else sorted((ROOT / unit).glob("*.py")))] + list(ROOT.glob("exp*.py"))
    literals = [(f"{p.relative_to(ROOT)}:{line}", set(values)) for p in files
                for line, values in _literals(ast.parse(p.read_text()))]
    for setting in SETTINGS.values():
        if setting.kind.choices is None or callable(setting.kind.choices):
            continue
        where = [at for at, values in literals if values == set(setting.choices())]
        assert len(where) <= 1, f"the choices of {setting.name} are typed {len(where)} times: {where}"


# ----------------------------------------------------------------------------- a researcher's new setting
ENTRY = ('    Setting("ses_margin", 0.0, number(low=0), "SES dead zone m in nats: R = sum_l (|H_l - t_l| - m)_+^2",\n'
         '            flag=True, label="m", to="SES", arg="margin"),\n')
USE = [  # (the line as it is in ses_core.py, the line with the margin)
    ('beta: float = 0.7, every: int = 1, solver: str = "float32", target: str = "logd"):',
     'beta: float = 0.7, every: int = 1, solver: str = "float32", target: str = "logd", margin: float = 0.0):'),
    ("        self.target = check_target(target)\n",
     "        self.target = check_target(target)\n        self.margin = margin\n"),
    ("r, hs = _penalty_terms(list(acts.values()), self.beta, self.solver, self.target)",
     "r, hs = _penalty_terms(list(acts.values()), self.beta, self.solver, self.target, self.margin)"),
    ('def _penalty_terms(acts: Sequence[torch.Tensor], beta: float, solver: str = "float32", target: str = "logd"):',
     'def _penalty_terms(acts: Sequence[torch.Tensor], beta: float, solver: str = "float32", target: str = "logd",\n'
     '                   margin: float = 0.0):'),
    ("    gap = hs - _TARGETS[key]  # H_l - t_l\n",
     "    gap = hs - _TARGETS[key]  # H_l - t_l\n    gap = (gap.abs() - margin).clamp_min(0)\n"),
]


def copy_with_margin(dest: Path) -> Path:
    """The repository's code (the root's modules and every unit's folder) with the docs' worked example:
    one entry in harness/settings.py, its use in ses_core.py."""
    dest.mkdir()
    for p in ROOT.glob("*.py"):
        shutil.copy(p, dest / p.name)
    for unit in FLOORS:
        if (ROOT / unit).is_dir():
            shutil.copytree(ROOT / unit, dest / unit, ignore=shutil.ignore_patterns("__pycache__"))
    table = (dest / "harness" / "settings.py").read_text()
    anchor = '    Setting("ses_target"'
    assert table.count(anchor) == 1
    (dest / "harness" / "settings.py").write_text(table.replace(anchor, ENTRY + anchor))
    core = (dest / "ses_core.py").read_text()
    for old, new in USE:
        assert core.count(old) == 1, f"ses_core.py no longer holds {old!r}: update the worked example (docs too)"
        core = core.replace(old, new)
    (dest / "ses_core.py").write_text(core)
    return dest


def test_a_new_ses_setting_is_one_table_entry_and_its_use_in_ses_core(tmp_path):
    """--help shows it, a bad value is one line and exit 2, config.json holds it, an override names the
    folder, and it acts on the penalty: with a dead zone wider than any |H - t| the SES run trains exactly
    like the baseline, with none (its default, the paper's penalty) it does not."""
    repo = copy_with_margin(tmp_path / "repo")
    script, out = repo / "exp10_periodic_ses.py", tmp_path / "out"
    shown = run([script, "--help"], cwd=repo)
    assert shown.returncode == 0 and "--ses-margin" in shown.stdout and "SES dead zone m in nats" in shown.stdout
    bad = run([script, "--smoke", "--ses-margin", "-1", "--out-dir", out], cwd=repo)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and "--ses-margin" in lines[0] and "ses_margin must be" in lines[0]
    common = ["--smoke", "--epochs", "1", "--lam", "1", "--out-dir", out]
    paper = run([script, "--configs", "baseline", "ses_k1", *common], cwd=repo)
    assert paper.returncode == 0, paper.stderr[-2000:]
    wide = run([script, "--configs", "ses_k1", "--ses-margin", "1000", *common], cwd=repo)
    assert wide.returncode == 0, wide.stderr[-2000:]
    exp = out / "smoke" / "exp10_periodic_ses"
    runs = {d.name: d for d in exp.iterdir() if d.is_dir()}
    assert set(runs) == {"baseline+epochs=1_seed0", "ses_k1+epochs=1+lam=1.0_seed0",  # --lam: SES configs only
                         "ses_k1+epochs=1+lam=1.0+ses_margin=1000.0_seed0"}
    config = {name: json.loads((d / "config.json").read_text())["config"] for name, d in runs.items()}
    metrics = {name: json.loads((d / "metrics.jsonl").read_text().splitlines()[-1]) for name, d in runs.items()}
    base, square, margin = (metrics[n] for n in ("baseline+epochs=1_seed0", "ses_k1+epochs=1+lam=1.0_seed0",
                                                "ses_k1+epochs=1+lam=1.0+ses_margin=1000.0_seed0"))
    assert config["ses_k1+epochs=1+lam=1.0_seed0"]["ses_margin"] == 0.0
    assert config["ses_k1+epochs=1+lam=1.0+ses_margin=1000.0_seed0"]["ses_margin"] == 1000.0
    assert square["ses_steps"] == margin["ses_steps"] == 2 and base["ses_steps"] == 0
    assert margin["train_loss"] == pytest.approx(base["train_loss"], rel=1e-6) and \
        margin["test_loss"] == pytest.approx(base["test_loss"], rel=1e-6)
    assert square["train_loss"] != pytest.approx(base["train_loss"], rel=1e-3)
