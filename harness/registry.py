"""What a script can bring to the harness: its models, hook presets, datasets, optimizers, per-epoch
callbacks and run settings, merged over the built-in ones into one read-only Registry per invocation.

    run_experiment(__file__, SETUP, GRID, __doc__, models={"perceiver": build_perceiver},
                   presets={"perceiver": {"latents": latent_taps}}, datasets={"modelnet40": MODELNET40},
                   optimizers={"lamb": make_lamb}, epoch_callbacks=[save_attention_maps],
                   settings=[Setting("pooling", "mean", choice(POOLINGS), "output pooling", flag=True, to="model"), ...])

An epoch callback is called as cb(model, data, run_dir, epoch, cfg) after each epoch's evaluation,
in eval mode with the SES collector paused (exp13 saves its attention maps this way).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

from data_utils import DATASETS
from harness.models import HOOK_PRESETS, MODEL_BUILDERS
from harness.settings import SETTINGS
from harness.table import Setting, Table
from harness.training import OPTIMIZERS


@dataclass(frozen=True)
class Registry:
    models: MappingProxyType
    presets: MappingProxyType
    datasets: MappingProxyType
    optimizers: MappingProxyType
    epoch_callbacks: tuple = field(default_factory=tuple)
    settings: Table = field(default_factory=lambda: SETTINGS)  # harness/settings.py plus the script's own


def make_registry(models=None, presets=None, datasets=None, optimizers=None, epoch_callbacks=(),
                  settings: tuple[Setting, ...] | list[Setting] = ()) -> Registry:
    """The built-ins plus a script's own entries (a script's entry wins on a name clash)."""
    return Registry(models=MappingProxyType({**MODEL_BUILDERS, **(models or {})}),
                    presets=MappingProxyType({**HOOK_PRESETS, **(presets or {})}),
                    datasets=MappingProxyType({**DATASETS, **(datasets or {})}),
                    optimizers=MappingProxyType({**OPTIMIZERS, **(optimizers or {})}),
                    epoch_callbacks=tuple(epoch_callbacks), settings=SETTINGS.extended(settings))
