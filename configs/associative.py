"""Multi-query associative recall (Zoology) and induction heads.

    python launch.py --config=configs/associative.py:quick --workdir=runs/mqar_quick
    python launch.py --config=configs/associative.py:task=induction,model=gru --workdir=runs/ind_gru

Arg: `task=mqar|induction`, `model=NAME`, `size=NAME`, `quick`, or dotted fields.
(Single-query-block recall, the walking-skeleton task, has its own file: recall.py.)
"""

from flaxformer_lite.config import make_config


def get_config(arg=None):
    return make_config(
        arg, task='mqar',
        defaults={'train.steps': 10000, 'train.batch_size': 64},
        quick={'train.steps': 1500, 'train.batch_size': 32, 'eval.every_steps': 500,
               'checkpoint.every_steps': 500,
               'mqar': {'task.seq_len': 64, 'task.num_pairs': 4, 'task.dependency_length': 8},
               'induction': {'task.seq_len': 32, 'task.dependency_length': 16}})
