"""Long-range dependencies: Transformers against parameter-matched LSTM, GRU and RNN
baselines as the dependency reaches further back.

    python launch.py --config=experiments/long_range.py:quick --sweep --workdir=runs/long_range --parallel=2
    python launch.py --report --workdir=runs/long_range
    python launch.py --config=experiments/long_range.py:quick,task=mqar --sweep --workdir=runs/long_range_mqar --parallel=2
    python launch.py --config=experiments/long_range.py:full --sweep --workdir=runs/long_range_full --slurm

Question: at equal non-embedding parameters, how does each family's accuracy fall as the
distance between cue and answer grows, and does a larger model of each family help?
Tasks: `copy` (the copying memory task; the default), `mqar` (multi-query associative
recall, Zoology) and `agreement` (subject-verb agreement across distractors, the verb's
number predicted at the verb); `task=` picks one.
Literature: Arora et al. (2024, "Zoology") find attention solves MQAR at every length
while recurrent models of the same size degrade as the number of bindings and their
distance grow.

Families: transformer, lstm, gru and rnn, and the fixed-state linear_attention and mingru
(quick: at the smallest size only; full adds mamba), each parameter-matched to the
Transformer of its size.

Arg: `quick` (micro and tiny models, lengths 16 and 64, 3 seeds: a 2-core CPU) or `full` (tiny
to small, lengths 16-1024, 3 seeds: accelerators); `task=copy|mqar|agreement`; `tune`
sweeps every family's learning rate at the smallest size instead (how LEARNING_RATES
below were chosen); `first_seed=N` runs seeds N, N+1, ... instead of 0, 1, ... (a rerun
with other seeds); `seeds=K` runs K seeds instead of the form's number (`seeds=2` is the
quick form as it was before it had 3). The report: accuracy against dependency length,
one line per family and size, mean over seeds with min-max bars, chance dashed; the table
gives each row's interval for a rerun's mean. Rerun with `first_seed=3` and report both sweeps together
(`--report --workdir=runs/long_range,runs/long_range_seeds345`) to check it.
"""

from flaxformer_lite import sweep
from flaxformer_lite.config import experiment_options, make_config
from flaxformer_lite.tasks import REGISTRY

CLASSIC = ('transformer', 'lstm', 'gru', 'rnn')
# Fixed-state families: linear attention and minGRU in quick, at its smallest
# size only (at tiny, length 64 their parallel scans cost 76 s and 98 s a trial on one
# core against 33 s for the GRU: measured; with them at both sizes the quick form took
# 14 min); Mamba only in full (its [batch, length, channels, state] scan costs 400 s a
# trial at tiny, length 64, against 68 s for the Transformer).
MODES = {
    'quick': dict(sizes=('micro', 'tiny'), lengths=(16, 64), seeds=3, steps=800, batch=32,
                  families=CLASSIC, modern=('linear_attention', 'mingru'), modern_sizes=('micro',)),
    'full': dict(sizes=('tiny', 'mini', 'small'), lengths=(16, 64, 256, 1024), seeds=3, steps=20000, batch=64,
                 families=CLASSIC, modern=('linear_attention', 'mingru', 'mamba'), modern_sizes=('tiny', 'mini', 'small')),
}
# The task's own knobs (its dependency_length and seq_len come from the sweep).
TASKS = {
    'copy': {'task.num_tokens': 4, 'task.num_symbols': 8},
    'mqar': {'task.num_pairs': 4, 'task.num_keys': 16, 'task.num_values': 16, 'task.num_noise': 4},
    # The verb's number, predicted at the verb; attractors of random number (with 'opposite' the
    # nearest noun always has the other number, a local cue every family learns: measured 1.0).
    'agreement': {'task.attractors': 'random', 'task.mode': 'lm'},
}
# Peak learning rate of each task and family: the best eval/accuracy (ties: the lowest
# eval/loss) of the `tune` sweep, run at the smallest size of the form and at TUNE_LENGTH
# (the same sweep, 800 steps, batch 32, chose every row). Reproduce with
#   python launch.py --config=experiments/long_range.py:quick,tune,task=copy --sweep --workdir=runs/lr_tune_copy
# and `--report` on it (its "Chosen" table). The other sizes use the smallest one's rates;
# the full form is not tuned yet: it uses the quick form's rates.
TUNE_LENGTH = {'copy': 16, 'mqar': 16, 'agreement': 64}
LEARNING_RATES = {
    'copy': {'transformer': 3e-2, 'lstm': 3e-2, 'gru': 1e-2, 'rnn': 1e-2, 'linear_attention': 3e-2, 'mingru': 1e-2},
    'mqar': {'transformer': 1e-2, 'lstm': 3e-3, 'gru': 1e-2, 'rnn': 3e-2, 'linear_attention': 3e-2, 'mingru': 1e-2},
    'agreement': {'transformer': 3e-3, 'lstm': 3e-3, 'gru': 1e-2, 'rnn': 3e-3, 'linear_attention': 3e-2,
                  'mingru': 1e-2},
}
TUNE_GRID = (1e-3, 3e-3, 1e-2, 3e-2)


def _options(arg):
    mode, tune, o = experiment_options(arg, task=('copy', tuple(TASKS)))
    return mode, o['task'], tune, o


def _length(task, length):
    """The dependency length and the shortest sequence that holds it (so the distance is
    the dependency, not padding)."""
    fields = {k.split('.', 1)[1]: v for k, v in TASKS[task].items()}
    seq_len = REGISTRY[task].min_seq_len({**fields, 'dependency_length': length})
    return {'task.dependency_length': length, 'task.seq_len': seq_len}


def get_config(arg=None):
    mode, task, _, _ = _options(arg)
    m = MODES[mode]
    return make_config(None, task=task, defaults={
        **TASKS[task], **_length(task, m['lengths'][0]),
        'model.size': m['sizes'][0], 'train.steps': m['steps'], 'train.batch_size': m['batch'],
        'optim.warmup_steps': m['steps'] // 20, 'train.log_every': 50, 'eval.every_steps': m['steps'] // 2,
        'eval.num_examples': 256 if mode == 'quick' else 2048, 'checkpoint.every_steps': m['steps'] // 2})


def _rate(task, family):
    """The tuned rate; Mamba (full only, never tuned on this CPU) takes the Transformer's."""
    return LEARNING_RATES[task]['transformer' if family == 'mamba' else family]


def get_sweep(arg=None):
    mode, task, tune, o = _options(arg)
    m = MODES[mode]
    if tune:
        return sweep.product({'model.name': list(m['families'] + m['modern']), 'optim.learning_rate': list(TUNE_GRID)},
                             {'model.size': m['sizes'][0]}, [_length(task, TUNE_LENGTH[task])])

    def grid(sizes, names):
        families = sweep.zip({'model.name': list(names), 'optim.learning_rate': [_rate(task, f) for f in names]})
        return sweep.product({'model.size': list(sizes)}, families, [_length(task, n) for n in m['lengths']],
                             sweep.experiment_seeds(o, m['seeds']))
    return grid(m['sizes'], m['families']) + grid(m['modern_sizes'], m['modern'])


def get_report(arg=None):
    mode, task, tune, _ = _options(arg)
    if tune:
        return {'title': f'long_range ({mode}, {task}): learning rate per family and size', 'metric': 'eval/accuracy',
                'x': 'optim.learning_rate', 'group': ['model.name', 'model.size'],
                'plots': ['accuracy_vs_dependency_length'], 'tuned': [], 'error_bars': 'minmax',
                'choose': {'field': 'optim.learning_rate', 'metric': 'eval/accuracy', 'tie': 'eval/loss',
                           'group': ['model.size', 'model.name']}}
    return {'title': f'long_range ({mode}, {task}): accuracy against dependency length', 'metric': 'test/accuracy',
            'x': 'task.dependency_length', 'group': ['model.name', 'model.size'],
            'plots': ['accuracy_vs_dependency_length'], 'error_bars': 'minmax'}
