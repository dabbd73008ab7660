"""The adding problem: two marked numbers in a long sequence; regress their sum.

    tokens  3 7 0 [5] 9 2 ... 4 [8] 1 6      (brackets: marked)
    target  v(5) + v(8)

Hochreiter & Schmidhuber (1997, "Long short-term memory", experiment 4); the form of
Le, Jaitly & Hinton (2015) and Arjovsky et al. (2016): a stream of random values in
[0, 1], exactly two of them marked, one in each part of the sequence; the target is
their sum. Here the values are quantised to `num_bins` bins so that one token carries
value and marker: token = 2 + bin + marked * num_bins, value(bin) = (bin + 0.5) /
num_bins. `dependency_length` is the length of the second part: the first marked value
lies at least `dependency_length` tokens before the end, where the model answers
(seq_len = 2 * dependency_length gives the classic "one in each half").
Chance: the MSE of predicting the mean sum 1.0, i.e. twice the variance of one value,
(num_bins^2 - 1) / (6 num_bins^2) (1/6 for continuous values).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from flaxformer_lite.spec import TaskSpec
from flaxformer_lite.tasks.base import Task
from flaxformer_lite.tasks.common import PAD, check_ints, check_seq_len

_FIRST = 2


class Adding(Task):
    name = 'adding'
    DEFAULTS = dict(
        seq_len=64,  # sequence length (T)
        dependency_length=32,  # length of the part holding the second marker
        num_bins=16,  # value quantisation
    )

    def __init__(self, cfg: Mapping):
        super().__init__(cfg)
        c = self.cfg
        check_ints(c, dict(seq_len=2, dependency_length=1, num_bins=2))
        check_seq_len(c, self.min_seq_len(c),
                      f"a first part of at least one token and a second of "
                      f"dependency_length={c['dependency_length']}")
        self.bins = c['num_bins']
        self.vocab_size = _FIRST + 2 * self.bins

    @classmethod
    def min_seq_len(cls, cfg: Mapping) -> int:
        return cfg['dependency_length'] + 1

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec(kind='regress', vocab_size=self.vocab_size, input_len=self.cfg['seq_len'],
                        target_len=1, num_outputs=1, pad_id=PAD)

    def value(self, token: np.ndarray) -> np.ndarray:
        """The number a token stands for (marked or not)."""
        return ((np.asarray(token) - _FIRST) % self.bins + 0.5) / self.bins

    def _generate(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        n, second = self.cfg['seq_len'], self.cfg['dependency_length']
        bins = rng.integers(0, self.bins, size=n)
        first_at = rng.integers(0, n - second)
        second_at = rng.integers(n - second, n)
        target = (bins[first_at] + bins[second_at] + 1.0) / self.bins
        tokens = _FIRST + bins
        tokens[[first_at, second_at]] += self.bins
        return dict(inputs=tokens.astype(np.int32), targets=np.asarray(target, np.float32),
                    weights=np.asarray(1.0, np.float32))

    def decode(self, example: Mapping[str, np.ndarray]) -> tuple[str, str]:
        tokens = example['inputs']
        marked = tokens >= _FIRST + self.bins
        words = [f'[{v:.5g}]' if m else f'{v:.5g}' for v, m in zip(self.value(tokens), marked)]
        return ' '.join(words), f"{float(example['targets']):.6g}"

    def chance(self) -> dict[str, float]:
        b = self.bins
        return {'mse': (b * b - 1) / (6.0 * b * b)}
