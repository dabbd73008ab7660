"""Byte-level language modelling on text files you name (default: Python's own sources).

    python launch.py --config=configs/text_lm.py:quick --workdir=runs/text_quick
    python launch.py --config=configs/text_lm.py:size=small --config.task.files="'~/corpus/*.txt'" --workdir=runs/lm

Arg: `model=NAME`, `size=NAME`, `quick`, or dotted fields. Loss by position in the
context is logged under eval/loss_at_position/* and as an image.
"""

from flaxformer_lite.config import make_config


def get_config(arg=None):
    return make_config(
        arg, task='text_lm',
        defaults={'train.steps': 10000, 'train.batch_size': 32, 'optim.learning_rate': 3e-3},
        quick={'task.seq_len': 64, 'train.steps': 1000, 'eval.every_steps': 500, 'eval.num_examples': 256,
               'checkpoint.every_steps': 500})
