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

Arg: `quick` (four widths from 24 to 64 at 2 layers, 1.2M training tokens, 1 seed: about
12 minutes on a 2-core CPU, most of it the tuning stage) or `full` (the size rows micro to
medium, 1B tokens, plus IsoFLOP profiles at four budgets); `files=GLOB` trains on your
text; `seeds=K`, `first_seed=N` as everywhere (`seeds=2` gives each width a spread, 16
runs more; `first_seed=2,seeds=2` a rerun to check it against).
Every family's peak learning rate is tuned at every width (and, in full, every IsoFLOP
point) at its own token budget, on eval/loss (the validation split), one seed per rate, a
choice at the grid's edge extended once; the main run of the tuning seed at the chosen
rate is the tuning run itself (copied, not trained again).
"""

from flaxformer_lite import sweep
from flaxformer_lite.config import experiment_options, make_config

FAMILIES = ('transformer', 'lstm', 'linear_attention', 'mingru')  # the last two: fixed-state
# Quick widths: 2 layers, 16-dimensional heads, d_ff = 4 d (the recurrent width is matched).
# 96 and 128 were dropped: with every width tuned (3 rates each) they held the quick form
# past a quarter of an hour.
QUICK_WIDTHS = (24, 32, 48, 64)
MODES = {
    'quick': dict(seq_len=128, batch=16, tokens=1.2e6, seeds=1, rates=(3e-3, 1e-2, 3e-2)),
    'full': dict(seq_len=1024, batch=64, tokens=1e9, seeds=1, sizes=('micro', 'tiny', 'mini', 'small', 'medium'),
                 budgets=(1e15, 3e15, 1e16, 3e16), rates=(3e-4, 1e-3, 3e-3, 1e-2)),
}


def _options(arg):
    mode, _, o = experiment_options(arg, files=(None, None))
    return mode, o


def get_config(arg=None):
    mode, o = _options(arg)
    files, m = o['files'], MODES[mode]
    steps = round(m['tokens'] / (m['batch'] * m['seq_len']))
    fields = {'task.seq_len': m['seq_len'], 'train.batch_size': m['batch'], 'train.steps': None,
              'train.tokens': m['tokens'], 'optim.warmup_steps': max(steps // 20, 10), 'train.log_every': 50,
              'eval.every_steps': max(steps // 8, 1),  # 3 evaluations in the last quarter: a convergence verdict 'checkpoint.every_steps': max(steps // 2, 1),
              'eval.num_examples': 256 if mode == 'quick' else 4096}
    if files:
        fields['task.files'] = (files,)
    return make_config(None, task='text_lm', defaults=fields)


def _widths(widths):
    return sweep.zip({'model.d_model': list(widths), 'model.num_heads': [max(w // 16, 1) for w in widths],
                      'model.d_ff': [4 * w for w in widths], 'model.num_layers': [2] * len(widths)})


def get_sweep(arg=None):
    mode, o = _options(arg)
    m = MODES[mode]
    seeds = sweep.experiment_seeds(o, m['seeds'])
    families = {'model.name': list(FAMILIES)}
    if mode == 'quick':
        main = sweep.product(families, _widths(QUICK_WIDTHS), seeds)
        by = ('model.name', 'model.d_model')
    else:
        equal_tokens = sweep.product(families, {'model.size': list(m['sizes'])}, seeds)
        isoflop = sweep.product(families, sweep.isoflop(m['budgets'], m['sizes']), seeds)
        main = sweep.concat(equal_tokens, isoflop)
        by = ('model.name', 'model.size', 'train.flops_budget')
    return sweep.tuned(main, {'optim.learning_rate': list(m['rates'])}, by=by, metric='eval/loss',
                       first_seed=o['first_seed'])


def get_report(arg=None):
    mode, _ = _options(arg)
    plots = ['loss_vs_params', 'loss_vs_compute', 'loss_by_position']
    if mode == 'full':
        plots += ['isoflop', 'optimal_params']
    # The loss is what this experiment measures: the tables' rerun interval and a report
    # over two sweeps (seeds=2, then first_seed=2,seeds=2) check it, not next-byte accuracy.
    return {'title': f'scaling_lm ({mode}): byte-level language modelling', 'loss_metric': 'test/loss',
            'metric': 'test/loss', 'plots': plots}
