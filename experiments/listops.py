"""ListOps (Nangia & Bowman 2018; the Long Range Arena's hierarchical task): the value
of a nested MAX / MIN / MED / SUM_MOD expression, as sequence classification.

    python launch.py --config=experiments/listops.py:quick --sweep --workdir=runs/listops --parallel=2
    python launch.py --report --workdir=runs/listops
    python launch.py --config=experiments/listops.py:full --sweep --workdir=runs/listops_full --slurm
    # the LRA release's files instead of generated expressions:
    python launch.py --config=experiments/listops.py:full,files=lra_release/listops-1000/basic_*.tsv ...

Question: a Transformer and an LSTM of matched size on expressions whose answer depends
on the whole (long) sequence. Literature: Tay et al. (2021, "Long Range Arena") report
36.37% test accuracy for the vanilla Transformer (4 layers, width 512, 8 heads, MLP
1024, lengths up to 2,000); chance is about 10% (classes 0-9, nearly uniform).

Arg: `quick` (expressions of 32-64 tokens, depth 3, the `tiny` Transformer and a matched
LSTM, 2 seeds: about 10 minutes on a 2-core CPU) or `full` (the LRA settings: lengths
500-2,000, depth 10, arity 10, the LRA Transformer); `first_seed=N`, `seeds=K` as
everywhere. Each family's peak learning rate is tuned at the main runs' size and budget
(one seed per rate, on eval/loss: the validation split; an edge choice extended once);
the main run of the tuning seed at the chosen rate is the tuning run itself.
"""

from flaxformer_lite import sweep
from flaxformer_lite.config import experiment_options, make_config

FAMILIES = ('transformer', 'lstm')
MODES = {
    'quick': dict(task={'task.seq_len': 64, 'task.dependency_length': 32, 'task.max_depth': 3, 'task.max_arity': 4},
                  model={'model.size': 'tiny'}, steps=1500, batch=32, seeds=2),
    'full': dict(task={'task.seq_len': 2000, 'task.dependency_length': 500, 'task.max_depth': 10,
                       'task.max_arity': 10},
                 # The LRA ListOps Transformer: 4 layers, width 512, 8 heads, MLP 1024, learned positions.
                 model={'model.size': 'medium', 'model.num_layers': 4, 'model.d_model': 512, 'model.num_heads': 8,
                        'model.d_ff': 1024, 'model.pos_encoding': 'learned', 'model.attention_impl': 'xla'},
                 steps=5000, batch=32, seeds=3),
}
RATES = {'quick': (1e-3, 3e-3, 1e-2), 'full': (1e-4, 3e-4, 1e-3, 3e-3)}


def _options(arg):
    mode, _, o = experiment_options(arg, files=(None, None))
    return mode, o


def get_config(arg=None):
    mode, o = _options(arg)
    files, m = o['files'], MODES[mode]
    fields = {**m['task'], **m['model'], 'train.steps': m['steps'], 'train.batch_size': m['batch'],
              'optim.warmup_steps': m['steps'] // 20, 'train.log_every': 50, 'eval.every_steps': m['steps'] // 8,
              'checkpoint.every_steps': m['steps'] // 3, 'eval.num_examples': 512 if mode == 'quick' else 2000}
    if files:
        fields['task.files'] = (files,)
    return make_config(None, task='listops', defaults=fields)


def get_sweep(arg=None):
    mode, o = _options(arg)
    main = sweep.product({'model.name': list(FAMILIES)}, sweep.experiment_seeds(o, MODES[mode]['seeds']))
    return sweep.tuned(main, {'optim.learning_rate': list(RATES[mode])}, by=('model.name',), metric='eval/loss',
                       first_seed=o['first_seed'])


def get_report(arg=None):
    mode, _ = _options(arg)
    return {'title': f'listops ({mode})', 'metric': 'test/accuracy', 'fits': False, 'plots': []}
