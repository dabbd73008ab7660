"""Learning-rate transfer across width: byte-level LM loss against the learning rate, one
curve per width, under the standard parametrisation and under muP.

    python launch.py --config=experiments/lr_transfer.py:quick --sweep --workdir=runs/lr_transfer --parallel=2
    python launch.py --report --workdir=runs/lr_transfer
    python launch.py --config=experiments/lr_transfer.py:quick,family=lstm --sweep --workdir=runs/lr_transfer_lstm --parallel=2

Question: does the learning rate that is best at the narrowest width stay best as the
width grows 8x? Tensor Programs V (Yang et al. 2022, Figure 1) shows the Transformer's
best Adam rate drifting down with width under SP and staying put under muP;
models/mup.py says what is and is not established for the other families (Mamba's plain
muP is reported not to transfer; nothing published tests LSTMs or GRUs). The report
plots eval/loss against optim.learning_rate, one line per (parametrisation, width), and
its "Chosen" table names the best rate of each: under a transferring parametrisation the
column is one value.

Arg: `quick` (the Transformer at widths 16, 32, 64, 128 with 2 heads, 2 layers, d_ff =
4 d_model, base width 16; six rates from 1e-3 to 3e-1; 400 steps of 16 x 64 bytes; both
parametrisations: 48 short trials, about a quarter of an hour with --parallel=2 on a
2-core CPU) or `full` (widths 64 to 1024 at 4 layers, nine rates, 5000 steps of 32 x 256
bytes: an accelerator's job); `family=NAME` sweeps another family's `model.hidden` (the
muP width of rnn, lstm, gru, linear_attention, mamba, mingru) instead of the Transformer's
d_model; `files=GLOB` trains on your text; `seeds=K`, `first_seed=N` as everywhere
(`tune` changes nothing: the sweep is a learning-rate grid already). The rates are
chosen on eval/loss; test/loss is shown only. The task's default corpus is the Python
standard library's own sources. One trial of the widest quick width took 62 s (30 s of
CPU) on the shared 2-core machine.
"""

from flaxformer_lite import sweep
from flaxformer_lite.config import experiment_options, make_config

FAMILIES = ('transformer', 'rnn', 'lstm', 'gru', 'linear_attention', 'mamba', 'mingru')
PARAMETRIZATIONS = ('sp', 'mup')
MODES = {
    'quick': dict(widths=(16, 32, 64, 128), layers=2, heads=2, seq_len=64, batch=16, steps=400, seeds=1,
                  rates=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)),
    'full': dict(widths=(64, 128, 256, 512, 1024), layers=4, heads=4, seq_len=256, batch=32, steps=5000, seeds=1,
                 rates=tuple(2.0 ** -k for k in range(12, 3, -1))),
}


def _options(arg):
    mode, tune, o = experiment_options(arg, family=('transformer', FAMILIES), files=(None, None))
    return mode, o


def get_config(arg=None):
    mode, o = _options(arg)
    m = MODES[mode]
    fields = {'model.name': o['family'], 'model.num_layers': m['layers'], 'task.seq_len': m['seq_len'],
              'train.batch_size': m['batch'], 'train.steps': m['steps'], 'optim.warmup_steps': m['steps'] // 20,
              'optim.base_width': m['widths'][0], 'train.log_every': 50,
              'eval.every_steps': m['steps'] // 8,  # 3 evaluations in the last quarter: a convergence verdict
              'checkpoint.every_steps': m['steps'] // 2, 'eval.num_examples': 256 if mode == 'quick' else 2048}
    fields.update(_width(o['family'], m, m['widths'][0]))
    if o['files']:
        fields['task.files'] = (o['files'],)
    return make_config(None, task='text_lm', defaults=fields)


def _width(family, m, width):
    """The fields of one width: the Transformer's d_model (a fixed head count, d_ff = 4
    d_model), another family's hidden (any multiple: nothing is matched to a size)."""
    if family == 'transformer':
        return {'model.d_model': width, 'model.num_heads': m['heads'], 'model.d_ff': 4 * width}
    fields = {'model.hidden': width, 'model.width_multiple': 1}
    if family == 'linear_attention':
        fields['model.num_heads'] = m['heads']
    return fields


def get_sweep(arg=None):
    mode, o = _options(arg)
    m = MODES[mode]
    widths = [_width(o['family'], m, w) for w in m['widths']]
    return sweep.product({'optim.parametrization': list(PARAMETRIZATIONS)}, widths,
                         {'optim.learning_rate': list(m['rates'])}, sweep.experiment_seeds(o, m['seeds']))


def get_report(arg=None):
    mode, o = _options(arg)
    width = 'model.d_model' if o['family'] == 'transformer' else 'model.hidden'
    group = ['optim.parametrization', width]
    return {'title': f'lr_transfer ({mode}, {o["family"]}): loss against learning rate per width',
            'metric': 'eval/loss', 'loss_metric': 'test/loss', 'x': 'optim.learning_rate', 'group': group,
            'plots': ['accuracy_vs_dependency_length'], 'fits': False, 'tuned': [], 'error_bars': 'minmax',
            'choose': {'field': 'optim.learning_rate', 'metric': 'eval/loss', 'group': group}}
