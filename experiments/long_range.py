"""Long-range dependencies: Transformers against parameter-matched LSTM, GRU, RNN and
fixed-state baselines as the dependency reaches further back, every family at its own
tuned learning rate.

    python launch.py --config=experiments/long_range.py:quick --sweep --workdir=runs/long_range --parallel=2
    python launch.py --report --workdir=runs/long_range
    python launch.py --config=experiments/long_range.py:quick,task=mqar --sweep --workdir=runs/long_range_mqar --parallel=2
    python launch.py --config=experiments/long_range.py:full --sweep --workdir=runs/long_range_full --slurm

Question: at equal non-embedding parameters, how does each family's accuracy fall as the
distance between cue and answer grows? Tasks: `copy` (the copying memory task; the
default), `mqar` (multi-query associative recall, Zoology) and `agreement` (subject-verb
agreement across distractors, the verb's number predicted at the verb); `task=` picks one.
Literature: Arora et al. (2024, "Zoology"): attention solves MQAR where fixed-state models
of the same size degrade as the bindings and their distance grow; Jelassi et al. (2024):
Transformers copy strings that fixed-state models cannot; Linzen et al. (2016): LSTMs'
agreement errors grow with attractors.

The protocol (sweep/tuning.py): every family's peak learning rate is tuned at every size
and length it runs at, at the budget of its main runs (one tuning seed per rate, on
eval/loss: the validation split); a choice at the edge of the grid is extended by one grid
step; the main run of the tuning seed at the chosen rate is the tuning run itself. The
examples are the task's (`task.seed`), the same for every family; a trial's seed sets the
initialisation and the order they come in. The report: accuracy against
dependency length, one line per family and size, mean over seeds with min-max bars,
chance dashed, each row's interval for a rerun's mean, and whether the runs converged.

Arg: `quick` (a 2-core CPU; per task below) or `full` (tiny to small, lengths 16-1024,
all seven families, 20,000 steps: accelerators); `task=copy|mqar|agreement`;
`first_seed=N` runs seeds N, N+1, ... (the tuning seed too: a rerun redoes the whole
protocol) and `seeds=K` K seeds instead of the form's number. Rerun with `first_seed=3`
and report both sweeps together (`--report --workdir=runs/long_range,runs/long_range_seeds345`)
to check the intervals. `tune` changes nothing: every form tunes.
"""

from flaxformer_lite import sweep
from flaxformer_lite.config import experiment_options, make_config
from flaxformer_lite.tasks import REGISTRY

CLASSIC = ('transformer', 'lstm', 'gru', 'rnn')
FIXED_STATE = ('linear_attention', 'mingru')
# The quick forms spend the 2-core budget on enough steps, not on many settings.
# copy and agreement: every family at `micro` (25k non-embedding parameters), two
# lengths. mqar: the `tiny` Transformer finds its induction solution between steps
# 1,250 and 2,000 at a rate of 1e-3 (the `micro` one does not within 3,000, measured),
# so 3,000 steps at `tiny`, one length; the RNN (at chance on MQAR at every rate tried)
# and minGRU (the slowest scan on a CPU) are in the full form only.
QUICK = {
    'copy': dict(sizes=('micro',), lengths=(16, 64), steps=800, families=CLASSIC + FIXED_STATE,
                 rates=(3e-3, 1e-2, 3e-2)),
    'agreement': dict(sizes=('micro',), lengths=(16, 64), steps=1200, families=CLASSIC + FIXED_STATE,
                      rates=(1e-3, 3e-3, 1e-2)),
    'mqar': dict(sizes=('tiny',), lengths=(16,), steps=3000, families=('transformer', 'lstm', 'gru', 'linear_attention'),
                 rates=(1e-3, 3e-3, 1e-2)),
}
FULL = dict(sizes=('tiny', 'mini', 'small'), lengths=(16, 64, 256, 1024), steps=20000,
            families=CLASSIC + FIXED_STATE + ('mamba',), rates=(3e-4, 1e-3, 3e-3, 1e-2))
SEEDS = 3
BATCH = {'quick': 32, 'full': 64}
# The task's own knobs (its dependency_length and seq_len come from the sweep).
TASKS = {
    'copy': {'task.num_tokens': 4, 'task.num_symbols': 8},
    'mqar': {'task.num_pairs': 4, 'task.num_keys': 16, 'task.num_values': 16, 'task.num_noise': 4},
    # The verb's number, predicted at the verb; attractors of random number (with 'opposite' the
    # nearest noun always has the other number, a local cue every family learns: measured 1.0).
    'agreement': {'task.attractors': 'random', 'task.mode': 'lm'},
}


def _options(arg):
    mode, _, o = experiment_options(arg, task=('copy', tuple(TASKS)))
    return mode, o['task'], o


def _form(mode, task):
    return QUICK[task] if mode == 'quick' else FULL


def _length(task, length):
    """The dependency length and the shortest sequence that holds it (so the distance is
    the dependency, not padding)."""
    fields = {k.split('.', 1)[1]: v for k, v in TASKS[task].items()}
    seq_len = REGISTRY[task].min_seq_len({**fields, 'dependency_length': length})
    return {'task.dependency_length': length, 'task.seq_len': seq_len}


def get_config(arg=None):
    mode, task, _ = _options(arg)
    m = _form(mode, task)
    return make_config(None, task=task, defaults={
        **TASKS[task], **_length(task, m['lengths'][0]),
        'model.size': m['sizes'][0], 'train.steps': m['steps'], 'train.batch_size': BATCH[mode],
        'optim.warmup_steps': m['steps'] // 20, 'train.log_every': 50,
        'eval.every_steps': m['steps'] // 8,  # 3 evaluations in the last quarter: a convergence verdict
        'eval.num_examples': 256 if mode == 'quick' else 2048, 'checkpoint.every_steps': m['steps'] // 2})


def get_sweep(arg=None):
    mode, task, o = _options(arg)
    m = _form(mode, task)
    lengths = [_length(task, n) for n in sorted(m['lengths'], reverse=True)]
    main = sweep.product({'model.name': list(m['families']), 'model.size': list(m['sizes'])}, lengths,
                         sweep.experiment_seeds(o, SEEDS))
    return sweep.tuned(main, {'optim.learning_rate': list(m['rates'])},
                       by=('model.name', 'model.size', 'task.dependency_length'), metric='eval/loss',
                       first_seed=o['first_seed'])


def get_report(arg=None):
    mode, task, _ = _options(arg)
    return {'title': f'long_range ({mode}, {task}): accuracy against dependency length', 'metric': 'test/accuracy',
            'x': 'task.dependency_length', 'group': ['model.name', 'model.size'],
            'plots': ['accuracy_vs_dependency_length'], 'error_bars': 'minmax'}
