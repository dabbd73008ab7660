"""Sequence to sequence: the paper's encoder-decoder Transformer against a recurrent
encoder-decoder with Bahdanau attention of matched size, as the sequences grow.

    python launch.py --config=experiments/translation.py:quick --sweep --workdir=runs/translation --parallel=2
    python launch.py --report --workdir=runs/translation
    python launch.py --config=experiments/translation.py:full --sweep --workdir=runs/translation_full --slurm

Question: on `seq2seq` (reversing a string: every output token depends on a distant
input token), how do exact match of greedy decoding and loss change with the length,
for each family? The Transformer here is Vaswani et al.'s (post-norm, ReLU, sinusoidal,
shared embeddings); the recurrent model is Bahdanau et al. (2015)'s attentive GRU
encoder-decoder, parameter-matched.

Arg: `quick` (the `tiny` size, lengths 8-32, 2 seeds: minutes on a 2-core CPU) or `full`
(`vaswani_base`, lengths 16-128, 3 seeds); `tune` sweeps the learning rates;
`mode=copy|reverse|sort` picks the transduction (default reverse).
"""

from flaxformer_lite import sweep
from flaxformer_lite.config import experiment_options, make_config

FAMILIES = ('transformer', 'gru')
MODES = {
    'quick': dict(size='tiny', lengths=(8, 16, 32), steps=1500, batch=32, seeds=2),
    'full': dict(size='vaswani_base', lengths=(16, 32, 64, 128), steps=20000, batch=64, seeds=3),
}
# Chosen on eval/exact_match by the `tune` sweep (quick, length 16):
#   python launch.py --config=experiments/translation.py:quick,tune --sweep --workdir=runs/lr_tune_translation
LEARNING_RATES = {'transformer': 1e-2, 'gru': 3e-3}
TUNE_GRID = (1e-3, 3e-3, 1e-2)


def _options(arg):
    mode, tune, o = experiment_options(arg, mode=('reverse', None))  # seq2seq's task.mode
    return mode, tune, o


def _length(n):
    return {'task.dependency_length': n, 'task.seq_len': n}


def get_config(arg=None):
    mode, _, o = _options(arg)
    transduction, m = o['mode'], MODES[mode]
    return make_config(None, task='seq2seq', defaults={
        **_length(m['lengths'][0]), 'task.mode': transduction, 'model.size': m['size'],
        'model.rnn_attention': 'bahdanau', 'model.bidirectional': True, 'train.steps': m['steps'],
        'train.batch_size': m['batch'], 'optim.warmup_steps': m['steps'] // 20, 'train.log_every': 50,
        'eval.every_steps': m['steps'] // 3, 'checkpoint.every_steps': m['steps'] // 3,
        'eval.num_examples': 256 if mode == 'quick' else 2048})


def get_sweep(arg=None):
    mode, tune, o = _options(arg)
    m = MODES[mode]
    if tune:
        return sweep.product({'model.name': list(FAMILIES), 'optim.learning_rate': list(TUNE_GRID)}, [_length(16)])
    families = sweep.zip({'model.name': list(FAMILIES), 'optim.learning_rate': [LEARNING_RATES[f] for f in FAMILIES]})
    return sweep.product(families, [_length(n) for n in m['lengths']], sweep.experiment_seeds(o, m['seeds']))


def get_report(arg=None):
    mode, tune, _ = _options(arg)
    if tune:
        return {'title': f'translation ({mode}): learning rates', 'metric': 'eval/exact_match',
                'x': 'optim.learning_rate', 'group': ['model.name'], 'plots': ['accuracy_vs_dependency_length'],
                'tuned': [], 'fits': False,
                'choose': {'field': 'optim.learning_rate', 'metric': 'eval/exact_match', 'tie': 'eval/loss',
                           'group': ['model.name']}}
    return {'title': f'translation ({mode}): exact match against length', 'metric': 'test/exact_match',
            'x': 'task.dependency_length', 'group': ['model.name'], 'plots': ['accuracy_vs_dependency_length'],
            'fits': False, 'error_bars': 'minmax',
            # Exact match is 1 in every quick trial, so a rerun is checked on the loss too.
            'reproduce': ['test/exact_match', 'test/loss']}
