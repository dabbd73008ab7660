"""Length generalisation: trained on short strings, evaluated on longer ones.

    python launch.py --config=experiments/length_generalisation.py:quick --sweep --workdir=runs/length_gen --parallel=2
    python launch.py --report --workdir=runs/length_gen
    python launch.py --config=experiments/length_generalisation.py:full --sweep --workdir=runs/length_gen_full --slurm

Question: a model trained on parity and Dyck strings of length <= 16 (parity: lengths
uniform in [1, 16]; Dyck: length 16) is evaluated on strings of exactly 32, 64 and 128
(`eval.dependency_lengths`): which families learned the rule rather than the lengths?
Literature: Delétang et al. (2023, "Neural Networks and the Chomsky Hierarchy") find
LSTMs generalise on parity and counting tasks where Transformers fail (the regular and
counter levels of their hierarchy); Hahn (2020) shows soft attention cannot represent
parity at every length. This is where the recurrent baselines should win.

Arg: `quick` (tiny models, 3 seeds: minutes on a 2-core CPU) or `full` (mini models,
lengths to 500, 5 seeds); `tune` sweeps each family's learning rate (how LEARNING_RATES
was chosen). The report: accuracy against the evaluated length, one line per family, one
panel per task, mean over seeds with min-max bars, chance dashed.
"""

from flaxformer_lite import sweep
from flaxformer_lite.config import experiment_options, make_config

FAMILIES = ('transformer', 'lstm', 'gru', 'rnn')
TASKS = {
    'parity': {'task.dependency_length': 16, 'task.seq_len': 16, 'task.variable_length': True},
    'dyck': {'task.dependency_length': 16, 'task.seq_len': 16, 'task.num_types': 2, 'task.max_depth': 8},
}
MODES = {
    'quick': dict(size='tiny', eval_lengths=(32, 64, 128), seeds=3, steps=1000, batch=32),
    'full': dict(size='mini', eval_lengths=(32, 64, 128, 256, 500), seeds=5, steps=20000, batch=128),
}
# Chosen on eval/accuracy (at the training length) by the `tune` sweep, ties by eval/loss:
#   python launch.py --config=experiments/length_generalisation.py:quick,tune --sweep --workdir=runs/lr_tune_lengen
LEARNING_RATES = {
    'parity': {'transformer': 1e-3, 'lstm': 3e-2, 'gru': 3e-2, 'rnn': 1e-2},
    'dyck': {'transformer': 1e-3, 'lstm': 1e-2, 'gru': 3e-3, 'rnn': 3e-3},
}
TUNE_GRID = (1e-3, 3e-3, 1e-2, 3e-2)


def _options(arg):
    # task=: a sweep's trials set task.name; get_config then gets task=
    mode, tune, o = experiment_options(arg, task=('parity', tuple(TASKS)))
    return mode, tune, o


def get_config(arg=None):
    mode, _, o = _options(arg)
    task, m = o['task'], MODES[mode]
    return make_config(None, task=task, defaults={
        **TASKS[task], 'model.size': m['size'], 'eval.dependency_lengths': m['eval_lengths'],
        'train.steps': m['steps'], 'train.batch_size': m['batch'], 'optim.warmup_steps': m['steps'] // 20,
        'train.log_every': 50, 'eval.every_steps': m['steps'] // 2, 'checkpoint.every_steps': m['steps'] // 2,
        'eval.num_examples': 512 if mode == 'quick' else 2048})


def get_sweep(arg=None):
    mode, tune, o = _options(arg)
    m = MODES[mode]
    if tune:
        return sweep.product({'task.name': list(TASKS), 'model.name': list(FAMILIES),
                              'optim.learning_rate': list(TUNE_GRID)})
    trials = []
    for task in TASKS:
        families = sweep.zip({'model.name': list(FAMILIES),
                              'optim.learning_rate': [LEARNING_RATES[task][f] for f in FAMILIES]})
        trials += sweep.product({'task.name': task}, families, sweep.experiment_seeds(o, m['seeds']))
    return trials


def get_report(arg=None):
    mode, tune, _ = _options(arg)
    if tune:
        return {'title': f'length_generalisation ({mode}): learning rate per family', 'metric': 'eval/accuracy',
                'x': 'optim.learning_rate', 'group': ['model.name'], 'plots': ['accuracy_vs_dependency_length'],
                'tuned': [], 'error_bars': 'minmax',
                'choose': {'field': 'optim.learning_rate', 'metric': 'eval/accuracy', 'tie': 'eval/loss',
                           'group': ['task.name', 'model.name']}}
    longer = [f'test/dep_{n}/accuracy' for n in MODES[mode]['eval_lengths']]
    return {'title': f'length_generalisation ({mode}): trained at length 16, evaluated longer',
            'metric': 'test/accuracy', 'group': ['model.name'], 'plots': ['length_generalization'],
            'error_bars': 'minmax', 'table_metrics': ['test/accuracy', *longer],
            'reproduce': ['test/accuracy', longer[-1]]}  # a rerun is checked at the longest length too
