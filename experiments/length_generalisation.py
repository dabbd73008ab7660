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

Arg: `quick` (tiny models, 1,000 steps, 3 seeds: a quarter of an hour on a 2-core CPU) or
`full` (mini models, lengths to 500, 5 seeds); `first_seed=N`, `seeds=K` as everywhere
(the tuning seed follows `first_seed`). Every family's peak learning rate is tuned per
task at the main runs' size and budget (one seed per rate, on eval/loss at the training
lengths: the validation split; a choice at the grid's edge is extended once), then the
main runs use it. The report: accuracy against the evaluated length, one line per family,
one panel per task, mean over seeds with min-max bars, chance dashed.
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
RATES = {'quick': (3e-3, 1e-2, 3e-2), 'full': (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)}


def _options(arg):
    # task=: a sweep's trials set task.name; get_config then gets task=
    mode, _, o = experiment_options(arg, task=('parity', tuple(TASKS)))
    return mode, o


def get_config(arg=None):
    mode, o = _options(arg)
    task, m = o['task'], MODES[mode]
    return make_config(None, task=task, defaults={
        **TASKS[task], 'model.size': m['size'], 'eval.dependency_lengths': m['eval_lengths'],
        'train.steps': m['steps'], 'train.batch_size': m['batch'], 'optim.warmup_steps': m['steps'] // 20,
        'train.log_every': 50, 'eval.every_steps': m['steps'] // 8, 'checkpoint.every_steps': m['steps'] // 2,
        'eval.num_examples': 512 if mode == 'quick' else 2048})


def get_sweep(arg=None):
    mode, o = _options(arg)
    m = MODES[mode]
    main = sweep.product({'task.name': list(TASKS), 'model.name': list(FAMILIES)},
                         sweep.experiment_seeds(o, m['seeds']))
    return sweep.tuned(main, {'optim.learning_rate': list(RATES[mode])}, by=('task.name', 'model.name'),
                       metric='eval/loss', first_seed=o['first_seed'])


def get_report(arg=None):
    mode, _ = _options(arg)
    longer = [f'test/dep_{n}/accuracy' for n in MODES[mode]['eval_lengths']]
    return {'title': f'length_generalisation ({mode}): trained at length 16, evaluated longer',
            'metric': 'test/accuracy', 'group': ['model.name'], 'plots': ['length_generalization'],
            'error_bars': 'minmax', 'table_metrics': ['test/accuracy', *longer],
            'reproduce': ['test/accuracy', longer[-1]]}  # a rerun is checked at the longest length too
