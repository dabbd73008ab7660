"""Does language-model pretraining help on long-range tasks? Pretrain a byte-level language
model, fine-tune it on ListOps and on subject-verb agreement, and compare it with the
same model trained from scratch on the same fine-tuning budget, for the Transformer and
the LSTM (GPT-style: the causal stack fine-tunes through a classifier head,
`model.arch=decoder_classifier`, pooled at the last token).

    python launch.py --config=experiments/transfer.py:quick,stage=pretrain --sweep --workdir=runs/transfer_pre --parallel=2
    python launch.py --config=experiments/transfer.py:quick,task=listops --sweep --workdir=runs/transfer_listops --parallel=2
    python launch.py --config=experiments/transfer.py:quick,task=agreement --sweep --workdir=runs/transfer_agreement --parallel=2
    python launch.py --report --workdir=runs/transfer_listops,runs/transfer_agreement --report_dir=runs/transfer_report

The fine-tuning sweeps start their `init=pretrained` trials from the pretraining sweep's
trial of the same family (`pretrained=DIR`, default runs/transfer_pre, relative to where
launch.py runs), so run the pretraining first. Only the layers transfer: the byte
embedding does not fit the tasks' vocabularies and the classifier head is new (both
start fresh, as the start-up log and results.json's `init_from` say).

Arg: `quick` (the `tiny` models; the default corpus, the Python standard library's own
sources; minutes on a 2-core CPU) or `full` (the `small` models, longer runs, 3 seeds;
name the corpus with `files=GLOB`); `stage=pretrain|finetune`, `task=listops|agreement`.
Learning rates: fine-tuning uses the rates `experiments/listops.py` chose for each family
(its `tune` sweep) for both tasks and both starts; pretraining uses the text_lm config's
3e-3 for both families. Neither was tuned for this experiment.
"""

import os

from flaxformer_lite import sweep
from flaxformer_lite.config import experiment_options, make_config
from flaxformer_lite.sweep.plan import trial_dir

FAMILIES = ('transformer', 'lstm')
PRETRAIN_LR = {'transformer': 3e-3, 'lstm': 3e-3}
FINETUNE_LR = {'transformer': 1e-3, 'lstm': 1e-2}  # experiments/listops.py's tune sweep
TASKS = {
    'listops': {'task.seq_len': 64, 'task.dependency_length': 32, 'task.max_depth': 3, 'task.max_arity': 4},
    'agreement': {'task.seq_len': 32, 'task.dependency_length': 16, 'task.mode': 'classify',
                  'task.attractors': 'random'},
}
MODES = {
    'quick': dict(size='tiny', pretrain_steps=800, seq_len=64, finetune_steps=400, batch=32, seeds=2),
    'full': dict(size='small', pretrain_steps=20000, seq_len=256, finetune_steps=3000, batch=64, seeds=3),
}


def _options(arg):
    mode, _, o = experiment_options(arg, stage=('finetune', ('pretrain', 'finetune')),
                                    task=('listops', tuple(TASKS)), pretrained=('runs/transfer_pre', None),
                                    files=(None, None))
    return mode, o


def _common(m, steps):
    return {'model.size': m['size'], 'train.steps': steps, 'train.batch_size': m['batch'],
            'optim.warmup_steps': steps // 20, 'train.log_every': 50, 'eval.every_steps': steps // 4,
            'checkpoint.every_steps': steps // 2, 'eval.num_examples': 512}


def get_config(arg=None):
    mode, o = _options(arg)
    m = MODES[mode]
    if o['stage'] == 'pretrain':
        fields = {**_common(m, m['pretrain_steps']), 'task.seq_len': m['seq_len']}
        if o['files']:
            fields['task.files'] = (o['files'],)
        return make_config(None, task='text_lm', defaults=fields)
    fields = {**_common(m, m['finetune_steps']), **TASKS[o['task']], 'model.arch': 'decoder_classifier',
              'model.pooling': 'last'}
    return make_config(None, task=o['task'], defaults=fields)


def pretrained_run(pretrained: str, family: str) -> str:
    """The folder of the pretraining sweep's trial of `family` (trial i is FAMILIES[i],
    named by the one field that varies: see get_sweep's pretrain stage)."""
    return os.path.join(pretrained, trial_dir(FAMILIES.index(family), f'model.name={family}'))


def get_sweep(arg=None):
    mode, o = _options(arg)
    if o['stage'] == 'pretrain':
        return sweep.zip({'model.name': list(FAMILIES), 'optim.learning_rate': [PRETRAIN_LR[f] for f in FAMILIES]})
    trials = []
    for family in FAMILIES:
        for init in (None, pretrained_run(o['pretrained'], family)):
            trials.append({'model.name': family, 'optim.learning_rate': FINETUNE_LR[family], 'train.init_from': init})
    return sweep.product(trials, sweep.experiment_seeds(o, MODES[mode]['seeds']))


def get_report(arg=None):
    mode, o = _options(arg)
    if o['stage'] == 'pretrain':
        return {'title': f'transfer ({mode}): pretraining', 'metric': 'test/loss', 'fits': False,
                'plots': ['learning_curves', 'loss_by_position']}
    return {'title': f'transfer ({mode}): fine-tuned from a language model against trained from scratch',
            'metric': 'test/accuracy', 'fits': False, 'group': ['model.name', 'train.init_from'],
            'plots': ['learning_curves'], 'error_bars': 'minmax'}
