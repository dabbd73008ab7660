"""The adding problem: regress the sum of two marked numbers in a long sequence (MSE).

    python launch.py --config=configs/adding.py:quick --workdir=runs/adding_quick
    python launch.py --config=configs/adding.py:model=lstm,task.dependency_length=128 --workdir=runs/add_lstm

Arg: `model=NAME`, `size=NAME`, `quick`, or dotted fields. Chance: the MSE of
predicting the mean (see --describe).
"""

from flaxformer_lite.config import make_config


def get_config(arg=None):
    return make_config(
        arg, task='adding',
        defaults={'train.steps': 5000, 'train.batch_size': 32},
        quick={'task.seq_len': 32, 'task.dependency_length': 16, 'train.steps': 1500,
               'eval.every_steps': 500, 'checkpoint.every_steps': 500})
