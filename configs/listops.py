"""ListOps (Nangia & Bowman 2018; Long Range Arena): the value 0-9 of a nested
MAX / MIN / MED / SUM_MOD expression, as sequence classification.

    python launch.py --config=configs/listops.py:quick --workdir=runs/listops_quick
    python launch.py --config=configs/listops.py --config.task.files="('lra/basic_train.tsv','lra/basic_val.tsv')" \\
        --config.task.seq_len=2000 --workdir=runs/listops_lra

Arg: `model=NAME`, `size=NAME`, `quick`, or dotted fields. With `task.files` the LRA
release's TSV files are read instead of generating expressions.
"""

from flaxformer_lite.config import make_config


def get_config(arg=None):
    return make_config(
        arg, task='listops',
        defaults={'train.steps': 10000, 'train.batch_size': 32},
        quick={'task.seq_len': 48, 'task.dependency_length': 16, 'task.max_depth': 3,
               'train.steps': 1500, 'eval.every_steps': 500, 'checkpoint.every_steps': 500})
