"""Scaling laws of byte-level language modelling: Transformers against LSTMs, linear
attention and minGRU of matched size, trained on the same tokens.

    python launch.py --config=experiments/scaling_lm.py:quick --sweep --workdir=runs/scaling_lm --parallel=2
    python launch.py --report --workdir=runs/scaling_lm
    python launch.py --config=experiments/scaling_lm.py:full --sweep --workdir=runs/scaling_lm_full --slurm

Question: how does test loss fall with non-embedding parameters N (and with training
compute C) for each family at an equal token budget, and how much of the context does
each use? `text_lm` reads bytes of `task.files` (default: Python's own sources, so it
runs anywhere); the report fits L(N) = E + A N^-alpha and the compute frontier L(C)
per family with bootstrap intervals, and plots the test loss at each position of the
context for the largest model of each family.
Literature: Kaplan et al. (2020, "Scaling laws for neural language models", Figure 7):
LSTMs scale worse than Transformers, and their per-token loss stops improving after
about 100 tokens of context while the Transformer's keeps falling.

Arg: `quick` (five widths from 24 to 96 at 2 layers, 1.2M training tokens, 1 seed:
minutes on a 2-core CPU) or `full` (the size rows micro to medium, 1B tokens, plus
IsoFLOP profiles at four budgets); `tune` sweeps each family's learning rate at width
32 in quick, the smallest size in full (how LEARNING_RATES was chosen); `files=GLOB`
trains on your text. `seeds=2` gives each size a spread (what experiments/README.md
shows: 40 trials), `first_seed=2,seeds=2` a rerun to check it against.
"""

from flaxformer_lite import sweep
from flaxformer_lite.config import experiment_options, make_config

FAMILIES = ('transformer', 'lstm', 'linear_attention', 'mingru')  # the last two: fixed-state
# Quick widths: 2 layers, 16-dimensional heads, d_ff = 4 d (the recurrent width is matched).
# 128 was dropped for 24: its four trials took 632 s of the 1,783 s the
# quick form's 20 trials took (measured), which held the quick form at 17 minutes.
QUICK_WIDTHS = (24, 32, 48, 64, 96)
TUNE_WIDTH = 32  # where LEARNING_RATES were chosen (the smallest width when they were)
MODES = {
    'quick': dict(seq_len=128, batch=16, tokens=1.2e6, seeds=1),
    'full': dict(seq_len=1024, batch=64, tokens=1e9, seeds=1, sizes=('micro', 'tiny', 'mini', 'small', 'medium'),
                 budgets=(1e15, 3e15, 1e16, 3e16)),
}
# Chosen on eval/loss at TUNE_WIDTH by the `tune` sweep:
#   python launch.py --config=experiments/scaling_lm.py:quick,tune --sweep --workdir=runs/lr_tune_scaling
LEARNING_RATES = {'transformer': 3e-2, 'lstm': 3e-2, 'linear_attention': 3e-2, 'mingru': 3e-2}
TUNE_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def _options(arg):
    mode, tune, o = experiment_options(arg, files=(None, None))
    return mode, tune, o


def get_config(arg=None):
    mode, _, o = _options(arg)
    files, m = o['files'], MODES[mode]
    steps = round(m['tokens'] / (m['batch'] * m['seq_len']))
    fields = {'task.seq_len': m['seq_len'], 'train.batch_size': m['batch'], 'train.steps': None,
              'train.tokens': m['tokens'], 'optim.warmup_steps': max(steps // 20, 10), 'train.log_every': 50,
              'eval.every_steps': max(steps // 2, 1), 'checkpoint.every_steps': max(steps // 2, 1),
              'eval.num_examples': 256 if mode == 'quick' else 4096}
    if files:
        fields['task.files'] = (files,)
    return make_config(None, task='text_lm', defaults=fields)


def _widths(widths):
    return sweep.zip({'model.d_model': list(widths), 'model.num_heads': [max(w // 16, 1) for w in widths],
                      'model.d_ff': [4 * w for w in widths], 'model.num_layers': [2] * len(widths)})


def get_sweep(arg=None):
    mode, tune, o = _options(arg)
    m = MODES[mode]
    seeds = sweep.experiment_seeds(o, m['seeds'])
    if tune:
        smallest = _widths((TUNE_WIDTH,)) if mode == 'quick' else [{'model.size': m['sizes'][0]}]
        return sweep.product({'model.name': list(FAMILIES), 'optim.learning_rate': list(TUNE_GRID)}, smallest)
    families = sweep.zip({'model.name': list(FAMILIES), 'optim.learning_rate': [LEARNING_RATES[f] for f in FAMILIES]})
    if mode == 'quick':
        return sweep.product(families, _widths(QUICK_WIDTHS), seeds)
    equal_tokens = sweep.product(families, {'model.size': list(m['sizes'])}, seeds)
    isoflop = sweep.product(families, sweep.isoflop(m['budgets'], m['sizes']), seeds)
    return sweep.concat(equal_tokens, isoflop)


def get_report(arg=None):
    mode, tune, _ = _options(arg)
    if tune:
        return {'title': f'scaling_lm ({mode}): learning rate per family', 'loss_metric': 'eval/loss',
                'fits': False, 'tuned': [], 'plots': [],
                'choose': {'field': 'optim.learning_rate', 'metric': 'eval/loss', 'group': ['model.name']}}
    plots = ['loss_vs_params', 'loss_vs_compute', 'loss_by_position']
    if mode == 'full':
        plots += ['isoflop', 'optimal_params']
    # The loss is what this experiment measures: the tables' rerun interval and a report
    # over two sweeps (seeds=2, then first_seed=2,seeds=2) check it, not next-byte accuracy.
    return {'title': f'scaling_lm ({mode}): byte-level language modelling', 'loss_metric': 'test/loss',
            'metric': 'test/loss', 'plots': plots}
