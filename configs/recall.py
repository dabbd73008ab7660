"""Associative recall (keys, values, a gap, then queries): the walking-skeleton task.

    python launch.py --config=configs/recall.py:quick --workdir=runs/recall_quick
    python launch.py --config=configs/recall.py:model=transformer,size=tiny --workdir=runs/t1
    python launch.py --config=configs/recall.py:model=lstm,size=tiny --workdir=runs/l1 --config.train.steps=2000

Arg: `model=NAME`, `size=NAME`, `quick` (a few minutes on a 2-core CPU), `task=mqar`,
or any dotted field (`task.dependency_length=64`).
"""

from flaxformer_lite.config import make_config


def get_config(arg=None):
    return make_config(
        arg, task='recall',
        defaults={
            'train.steps': 5000,
            'train.batch_size': 32,
            'optim.learning_rate': 1e-3,
        },
        # A few minutes on a 2-core CPU: 4 pairs over 16 keys, dependency length 8, and
        # the `mini` Transformer (`tiny` lacks the capacity: it stalls near 56% accuracy).
        quick={
            'model.size': 'mini',
            'task.seq_len': 32,
            'task.dependency_length': 8,
            'task.num_pairs': 4,
            'task.num_queries': 4,
            'task.num_keys': 16,
            'task.num_values': 16,
            'train.steps': 1500,
            'eval.every_steps': 250,
            'checkpoint.every_steps': 500,
        })
