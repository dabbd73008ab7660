"""Sequence to sequence (reverse, copy or sort a string): the paper's encoder-decoder
setting, evaluated by exact match of greedy autoregressive output.

    python launch.py --config=configs/seq2seq.py:quick --workdir=runs/s2s_quick
    python launch.py --config=configs/seq2seq.py:model=lstm,model.rnn_attention=bahdanau --workdir=runs/s2s_lstm
    python launch.py --config=configs/seq2seq.py:size=vaswani_base --describe

Arg: `model=NAME`, `size=NAME`, `quick`, or dotted fields (`task.mode=sort`).
"""

from flaxformer_lite.config import make_config


def get_config(arg=None):
    return make_config(
        arg, task='seq2seq',
        defaults={'train.steps': 5000, 'train.batch_size': 32},
        quick={'task.seq_len': 12, 'task.dependency_length': 8, 'train.steps': 1500,
               'eval.every_steps': 500, 'eval.num_examples': 256, 'checkpoint.every_steps': 500})
