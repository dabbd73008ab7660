"""Formal languages as classification: parity of a bit string, balanced brackets (Dyck).

    python launch.py --config=configs/formal.py:quick --workdir=runs/dyck_quick
    python launch.py --config=configs/formal.py:task=parity,model=gru --workdir=runs/parity_gru

Arg: `task=dyck|parity`, `model=NAME`, `size=NAME`, `quick`, or dotted fields.
"""

from flaxformer_lite.config import make_config


def get_config(arg=None):
    return make_config(
        arg, task='dyck',
        defaults={'train.steps': 5000, 'train.batch_size': 32},
        quick={'task.seq_len': 32, 'task.dependency_length': 16, 'train.steps': 1500,
               'eval.every_steps': 500, 'checkpoint.every_steps': 500})
