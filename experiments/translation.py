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

Arg: `quick` (the `tiny` size, lengths 16 and 32, 2 seeds: about 12 minutes on a 2-core
CPU) or `full` (`vaswani_base`, lengths 16-128, 3 seeds); `mode=copy|reverse|sort` picks
the transduction (default reverse); `first_seed=N`, `seeds=K` as everywhere. Each family's
peak learning rate is tuned at every length, at the main runs' size and budget (one seed
per rate, on eval/loss: the validation split; an edge choice extended once); the main run
of the tuning seed at the chosen rate is the tuning run itself.
"""

from flaxformer_lite import sweep
from flaxformer_lite.config import experiment_options, make_config

FAMILIES = ('transformer', 'gru')
MODES = {
    'quick': dict(size='tiny', lengths=(16, 32), steps=1500, batch=32, seeds=2),
    'full': dict(size='vaswani_base', lengths=(16, 32, 64, 128), steps=20000, batch=64, seeds=3),
}
RATES = {'quick': (1e-3, 3e-3, 1e-2), 'full': (1e-4, 3e-4, 1e-3, 3e-3)}


def _options(arg):
    mode, _, o = experiment_options(arg, mode=('reverse', None))  # seq2seq's task.mode
    return mode, o


def _length(n):
    return {'task.dependency_length': n, 'task.seq_len': n}


def get_config(arg=None):
    mode, o = _options(arg)
    transduction, m = o['mode'], MODES[mode]
    return make_config(None, task='seq2seq', defaults={
        **_length(m['lengths'][0]), 'task.mode': transduction, 'model.size': m['size'],
        'model.rnn_attention': 'bahdanau', 'model.bidirectional': True, 'train.steps': m['steps'],
        'train.batch_size': m['batch'], 'optim.warmup_steps': m['steps'] // 20, 'train.log_every': 50,
        'eval.every_steps': m['steps'] // 8, 'checkpoint.every_steps': m['steps'] // 3,
        'eval.num_examples': 256 if mode == 'quick' else 2048})


def get_sweep(arg=None):
    mode, o = _options(arg)
    m = MODES[mode]
    lengths = [_length(n) for n in sorted(m['lengths'], reverse=True)]  # the slowest first
    main = sweep.product({'model.name': list(FAMILIES)}, lengths, sweep.experiment_seeds(o, m['seeds']))
    return sweep.tuned(main, {'optim.learning_rate': list(RATES[mode])}, by=('model.name', 'task.dependency_length'),
                       metric='eval/loss', first_seed=o['first_seed'])


def get_report(arg=None):
    mode, _ = _options(arg)
    return {'title': f'translation ({mode}): exact match against length', 'metric': 'test/exact_match',
            'x': 'task.dependency_length', 'group': ['model.name'], 'plots': ['accuracy_vs_dependency_length'],
            'fits': False, 'error_bars': 'minmax',
            # Exact match is 1 in nearly every quick trial, so a rerun is checked on the loss too.
            'reproduce': ['test/exact_match', 'test/loss']}
