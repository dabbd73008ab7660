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
Learning rates: every stage tunes its own, at its own budget, on eval/loss (the validation
split; one seed per rate; an edge choice extended once): pretraining per family,
fine-tuning per family and start (a pretrained model and a fresh one each get their best
rate, so the comparison is not decided by a rate that suits one start). The main run of
the tuning seed at the chosen rate is the tuning run itself. `first_seed=N`, `seeds=K` as
everywhere.
"""

import json
import os

from flaxformer_lite import sweep
from flaxformer_lite.config import experiment_options, make_config
from flaxformer_lite.sweep.plan import trial_dir

FAMILIES = ('transformer', 'lstm')
RATES = {'pretrain': (1e-3, 3e-3, 1e-2), 'finetune': (1e-3, 3e-3, 1e-2)}
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
    """The folder of the pretraining sweep's main trial of `family`: read from its
    sweep.json once it ran, else the folder it will have (trial i is FAMILIES[i], named by
    the fields that vary: see get_sweep's pretrain stage)."""
    try:
        with open(os.path.join(pretrained, 'sweep.json')) as f:
            recorded = json.load(f)
        for trial in recorded['trials']:
            if trial['overrides'].get('model.name') == family:
                return os.path.join(pretrained, trial['dir'])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return os.path.join(pretrained, trial_dir(FAMILIES.index(family), f'model.name={family}'))


def get_sweep(arg=None):
    mode, o = _options(arg)
    seeds = sweep.experiment_seeds(o, MODES[mode]['seeds'])
    if o['stage'] == 'pretrain':
        main = sweep.product({'model.name': list(FAMILIES)}, sweep.seeds(1, start=o['first_seed']))
        return sweep.tuned(main, {'optim.learning_rate': list(RATES['pretrain'])}, by=('model.name',),
                           metric='eval/loss', first_seed=o['first_seed'])
    starts = [{'model.name': family, 'train.init_from': init}
              for family in FAMILIES for init in (None, pretrained_run(o['pretrained'], family))]
    return sweep.tuned(sweep.product(starts, seeds), {'optim.learning_rate': list(RATES['finetune'])},
                       by=('model.name', 'train.init_from'), metric='eval/loss', first_seed=o['first_seed'])


def get_report(arg=None):
    mode, o = _options(arg)
    if o['stage'] == 'pretrain':
        return {'title': f'transfer ({mode}): pretraining', 'metric': 'test/loss', 'fits': False,
                'plots': ['learning_curves', 'loss_by_position']}
    return {'title': f'transfer ({mode}): fine-tuned from a language model against trained from scratch',
            'metric': 'test/accuracy', 'fits': False, 'group': ['model.name', 'train.init_from'],
            'plots': ['learning_curves'], 'error_bars': 'minmax'}
