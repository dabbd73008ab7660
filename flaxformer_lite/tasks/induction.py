"""Induction: predict the token that followed the earlier occurrence of the current one.

    ^ 5 9 2 [A] B 7 1 4 ... 8 0 3 [A] -> B
              \\____ dependency_length ____/

Olsson et al. (2022, "In-context learning and induction heads"): the two-layer
attention circuit that finds the previous occurrence of the current token and copies
its successor ([A][B] ... [A] -> [B]) appears as a phase change in training and
carries much of in-context learning. A random stream over `num_symbols` symbols holds
the trigger A exactly twice, `dependency_length` tokens apart, the second time at the
last input position; the model must then predict B. Only that position counts.
Chance: 1 / (num_symbols - 1): B is uniform over the symbols other than A, which a
model that reads the current token but nothing further back can rule out.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from flaxformer_lite.tasks.base import LMTask
from flaxformer_lite.tasks.common import BOS, PAD, check_ints, check_seq_len, lm_example

_FIRST = 2


class Induction(LMTask):
    name = 'induction'
    DEFAULTS = dict(
        seq_len=64,  # model input length
        dependency_length=32,  # distance between the two occurrences of the trigger (>= 2)
        num_symbols=16,  # alphabet of the stream
    )

    def __init__(self, cfg: Mapping):
        super().__init__(cfg)
        c = self.cfg
        check_ints(c, dict(seq_len=2, dependency_length=2, num_symbols=3))
        check_seq_len(c, self.min_seq_len(c),
                      f"two occurrences of the trigger dependency_length={c['dependency_length']} apart")
        self.vocab_size = _FIRST + c['num_symbols']

    @classmethod
    def min_seq_len(cls, cfg: Mapping) -> int:
        return cfg['dependency_length'] + 2  # <s>, then the first occurrence

    def _generate(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        c = self.cfg
        n, k = c['seq_len'], c['num_symbols']
        trigger = int(rng.integers(0, k))
        # Symbols other than the trigger: draw from k - 1 and skip over it.
        stream = rng.integers(0, k - 1, size=n + 1)
        stream += stream >= trigger
        second = n - 1  # last input position; tokens[n] is the answer
        first = second - c['dependency_length']
        stream[[first, second]] = trigger
        stream[second + 1] = stream[first + 1]
        tokens = _FIRST + stream
        tokens[0] = BOS
        return lm_example(tokens, [second])

    def _name(self, token: int) -> str:
        return {PAD: '_', BOS: '^'}.get(int(token)) or str(token - _FIRST)

    def chance(self) -> dict[str, float]:
        return {'accuracy': 1.0 / (self.cfg['num_symbols'] - 1)}
