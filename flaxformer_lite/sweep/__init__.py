"""Sweeps: definitions (`get_sweep(arg)` in a config file, built from the helpers here),
sweep.json, and running the trials here (`--parallel=N`), one by one (`--trial=I`) or as
a SLURM job array (`--slurm`).

    from flaxformer_lite import sweep

    def get_sweep(arg):
        return sweep.product({'model.name': ['transformer', 'lstm'],
                              'task.dependency_length': [8, 16, 32]}, sweep.seeds(3))

    python launch.py --config=FILE.py:ARG --sweep --workdir=runs/s1 --dry_run
    python launch.py --config=FILE.py:ARG --sweep --workdir=runs/s1 --parallel=2
    python launch.py --report --workdir=runs/s1

`sweep.tuned(trials, {'optim.learning_rate': [...]}, by=('model.name', 'model.size'))` adds
a tuning stage: each group's value is chosen on the validation split before the main
trials run (sweep/tuning.py).
"""

from flaxformer_lite.sweep.define import (Distribution, Trial, choice, concat, experiment_seeds, int_log_uniform,
                                          isoflop, log_uniform, product, random, seeds, uniform, zip)
from flaxformer_lite.sweep.tuning import Tuned, tuned

__all__ = ['Distribution', 'Trial', 'choice', 'concat', 'experiment_seeds', 'int_log_uniform', 'isoflop',
           'log_uniform', 'product', 'random', 'seeds', 'tuned', 'Tuned', 'uniform', 'zip']
