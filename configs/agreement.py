"""Subject-verb number agreement across distractor words and clauses (Linzen et al. 2016).

    python launch.py --config=configs/agreement.py:quick --workdir=runs/agree_quick
    python launch.py --config=configs/agreement.py:model=lstm,task.attractors=opposite --workdir=runs/agree_lstm

Arg: `model=NAME`, `size=NAME`, `quick`, or dotted fields (`task.mode=lm` predicts the
verb as language modelling instead of classifying the subject's number).
"""

from flaxformer_lite.config import make_config


def get_config(arg=None):
    return make_config(
        arg, task='agreement',
        defaults={'train.steps': 5000, 'train.batch_size': 32},
        quick={'train.steps': 1500, 'eval.every_steps': 500, 'checkpoint.every_steps': 500})
