"""Every run setting of the harness, declared once (harness/table.py says what each column means).

From this table come harness.config.DEFAULTS, the setting flags of every script's command line and their
checks, the check of every run's resolved settings (a bad value or an unknown key in a grid is one line
and exit 2), config.json (the resolved settings), the folder name of an override (identity settings
only), the keyword arguments of ses_core.SES (the entries with to="SES"), and the labels of tables and
figures (SETTINGS.label; report.py hands them to the report, and each run's result.json keeps the
labels of its overridden settings). A script adds its own entries (exp13_perceiver.py: SETTINGS, passed as
run_experiment(..., settings=SETTINGS)). A new SES option is one entry here plus its use in ses_core.py
(docs/architecture.md, "Change the method").

The defaults are the paper's CIFAR-100 setup; scripts change them per setup and config.
"""
from __future__ import annotations

from batches import MIXES
from harness.table import BOOLEAN, TEXT, Setting, Table, choice, integer, integers, number, numbers, optional
from harness.training import AMP_MODES, SCHEDULERS
from ses_core import TARGETS, check_beta, check_every, check_lam

SETTINGS = Table([
    # ------------------------------------------------------------------ what is trained
    Setting("dataset", "cifar100", choice(lambda reg: reg.datasets), "dataset", to="data"),
    Setting("model", "resnet18", choice(lambda reg: reg.models), "model", to="model"),
    Setting("layers", "all", TEXT, "hooked layers: a preset of the model or comma-separated module names",
            flag=True, label="hooks", to="hooks"),
    Setting("spectral_norm", False, BOOLEAN, "spectral norm on every Conv2d and Linear (the paper's Exp 3 baseline)",
            label="SN", to="model"),
    Setting("val_size", 0, integer(0), "a validation split of this many training samples (0: evaluate on test)",
            to="data"),
    Setting("mix", "none", choice(MIXES), "Mixup / CutMix of each training batch", to="data"),
    Setting("mix_alpha", 1.0, number(above=0), "the Beta(alpha, alpha) of Mixup / CutMix", label="α", to="data"),
    # ------------------------------------------------------------------ how it is trained
    Setting("epochs", 60, integer(1), "epochs (the LR milestones keep their fractions of the schedule)",
            flag=True, to="training"),
    Setting("batch_size", 256, integer(1), "training batch size (SES sees batches of this size)", flag=True,
            label="batch", to="training"),
    Setting("amp", "auto", choice(AMP_MODES), "precision: auto = bf16 autocast on GPUs of compute capability >= 8, "
            "fp16 + GradScaler below, fp32 on a CPU; or force one", flag=True, label="precision", to="training"),
    Setting("optimizer", "sgd", choice(lambda reg: reg.optimizers), "optimizer", flag=True, to="training"),
    Setting("lr", 0.1, number(above=0), "peak learning rate", flag=True, to="training"),
    Setting("momentum", 0.9, number(low=0, below=1), "SGD momentum", to="training"),
    Setting("weight_decay", 5e-4, number(low=0), "weight decay", label="wd", to="training"),
    Setting("nesterov", False, BOOLEAN, "Nesterov momentum (SGD)", to="training"),
    Setting("clip_grad", None, optional(number(above=0)), "clip the global gradient norm to this value "
            "(none: no clipping, the paper's ResNets)", flag=True, label="clip", to="training"),
    Setting("scheduler", "multistep", choice(SCHEDULERS), "LR schedule: multistep (x gamma at the milestones), "
            "cosine, or step (x gamma every step_size epochs)", flag=True, to="training"),
    Setting("milestones", [25, 40, 52], integers(1), "epochs of the multistep LR drops, for a schedule of "
            "schedule_epochs epochs", to="training"),
    Setting("schedule_epochs", 60, integer(1), "the epoch count the milestones are given for (they scale to "
            "--epochs)", to="training"),
    Setting("step_size", 30, integer(1), "epochs between the step schedule's drops, for a schedule of "
            "schedule_epochs epochs", to="training"),
    Setting("gamma", 0.1, number(above=0), "the LR factor at each drop", to="training"),
    # ------------------------------------------------------------------ SES (ses_core.SES(..., <arg>=<value>))
    Setting("ses", False, BOOLEAN, "SES on (the penalty is added) or off (the baseline)", label="SES", to="run"),
    Setting("lam", 0.01, number(), "SES weight lambda", check=check_lam, flag=True, label="λ", to="SES"),
    Setting("beta", 0.7, number(), "SES target fraction beta of log d", check=check_beta, flag=True, label="β",
            to="SES"),
    Setting("every", 1, integer(), "SES period k: the penalty on steps with step % k == 0", check=check_every,
            flag=True, label="k", to="SES"),
    Setting("ses_target", "logd", choice(TARGETS), "SES target per layer: logd = beta * log d (the paper's), "
            "rank = beta * log min(d, n - 1), which a batch of n can reach", flag=True,
            label="target", to="SES", arg="target"),
    # ------------------------------------------------------------------ what is measured
    Setting("eval_batch_size", 1024, integer(1), "evaluation chunk size (accuracy, noise, training subset); "
            "lower it if the final stage runs out of memory", flag=True, identity=False, to="evaluation"),
    Setting("attack_batch_size", 64, integer(1), "FGSM chunk size in the final metrics; lower it if the final "
            "stage runs out of memory", flag=True, identity=False, to="evaluation"),
    Setting("noise_sigmas", [0.05, 0.1], numbers(0), "Gaussian noise sigmas (on [0, 1] pixels) of the "
            "robustness suite", to="evaluation"),
    Setting("fgsm_eps", [1 / 255, 2 / 255], numbers(0), "FGSM epsilons of the robustness suite", to="evaluation"),
    Setting("rob_sigma", 0.1, number(low=0), "the noise sigma of the headline rob (one of noise_sigmas)",
            label="σ", to="evaluation"),
    Setting("train_eval_size", 10_000, integer(1), "the fixed training subset train_acc is measured on",
            to="evaluation"),
    Setting("baseline_config", "baseline", TEXT, "the config this one is compared with (its twin)", to="report"),
])
