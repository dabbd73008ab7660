"""Copying memory: read a short sequence, wait, then reproduce it.

    ^ 3 1 4 1 5 9 2 6 5 3 _ _ _ ... _ : 3 1 4 1 5 9 2 6 5 3 . .
      \\____ data ____/ \\_ blanks _/   \\_____ answers _____/

Hochreiter & Schmidhuber (1997) introduced the long-delay copying experiments;
Arjovsky, Shah & Bengio (2016, "Unitary evolution RNNs") fixed the form used since:
10 symbols from an alphabet of 8, T blanks, a delimiter, then the symbols again.
As language modelling: after the delimiter ':' the model must predict each data symbol
in turn; only those positions count. `dependency_length` is T, the number of blanks
between the data and the delimiter, so data symbol i is reproduced
`num_tokens + dependency_length + 1` tokens after it was shown. Positions after the
answers are padding. Chance: 1 / num_symbols per answer (the memoryless baseline of
Arjovsky et al.: blanks are free, each answer symbol a uniform guess).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from flaxformer_lite.tasks.base import LMTask
from flaxformer_lite.tasks.common import BOS, PAD, check_ints, check_seq_len, lm_example

BLANK, DELIM = 2, 3
_FIRST = 4  # first data symbol


class Copy(LMTask):
    name = 'copy'
    DEFAULTS = dict(
        seq_len=64,  # model input length
        dependency_length=32,  # blanks between the data and the delimiter (T)
        num_tokens=10,  # symbols to memorise
        num_symbols=8,  # data alphabet
    )

    SHOW_CUE = False  # the cue of every answer is the previous answer: show the answers

    def __init__(self, cfg: Mapping):
        super().__init__(cfg)
        self._check(self.cfg)
        self.vocab_size = _FIRST + self.cfg['num_symbols']

    def _check(self, c: Mapping) -> None:
        check_ints(c, dict(seq_len=1, dependency_length=0, num_tokens=1, num_symbols=2))
        check_seq_len(c, self.min_seq_len(c),
                      f"{c['num_tokens']} symbols, dependency_length={c['dependency_length']} "
                      f"blanks and the {c['num_tokens']} answers")

    @classmethod
    def min_seq_len(cls, cfg: Mapping) -> int:
        return 2 * cfg['num_tokens'] + cfg['dependency_length'] + 1

    def _generate(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        c = self.cfg
        k, gap = c['num_tokens'], c['dependency_length']
        tokens = np.full(c['seq_len'] + 1, PAD, np.int32)
        data = _FIRST + rng.integers(0, c['num_symbols'], size=k)
        tokens[0] = BOS
        tokens[1:1 + k] = data
        tokens[1 + k:1 + k + gap] = BLANK
        delim = 1 + k + gap
        tokens[delim] = DELIM
        tokens[delim + 1:delim + 1 + k] = data
        return lm_example(tokens, slice(delim, delim + k))

    def _name(self, token: int) -> str:
        return {PAD: '.', BOS: '^', BLANK: '_', DELIM: ':'}.get(int(token)) or str(token - _FIRST)

    def chance(self) -> dict[str, float]:
        return {'accuracy': 1.0 / self.cfg['num_symbols']}
