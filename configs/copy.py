"""Copying memory and selective copy: reproduce tokens seen `dependency_length` steps ago.

    python launch.py --config=configs/copy.py:quick --workdir=runs/copy_quick
    python launch.py --config=configs/copy.py:task=selective_copy,model=lstm --workdir=runs/sc_lstm

Arg: `task=copy|selective_copy`, `model=NAME`, `size=NAME`, `quick`, or dotted fields.
"""

from flaxformer_lite.config import make_config


def get_config(arg=None):
    return make_config(
        arg, task='copy',
        defaults={'train.steps': 5000, 'train.batch_size': 32},
        quick={'task.seq_len': 32, 'task.dependency_length': 12, 'task.num_tokens': 6,
               'train.steps': 1500, 'eval.every_steps': 500, 'checkpoint.every_steps': 500})
