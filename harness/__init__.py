"""The machinery every experiment script shares: command line, sweep, one run, checkpoints, training and evaluation, models, claims, several GPUs."""
