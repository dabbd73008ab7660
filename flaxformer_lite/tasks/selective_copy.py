"""Selective copying: symbols scattered among noise, reproduce them in order.

    ^ _ 3 _ _ _ 1 _ 4 _ _ _ _ 1 _ _ 5 _ : 3 1 4 1 5 . .
      \\_______ region (dependency_length) _______/   \\answers/

Gu & Dao (2023, "Mamba", section 3.1 and table 1) use it to show that a model must
*select* what to remember by content, not by position: unlike `copy`, the data
symbols sit at random positions of a noise region, so no fixed time-invariant
kernel solves it. As language modelling: after the delimiter ':' the model predicts
the symbols in the order shown; only those positions count. `dependency_length` is
the length of the region, so the first symbol may have to be carried up to
`dependency_length + 1` tokens. Chance: 1 / num_symbols per answer.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from flaxformer_lite.tasks.base import require
from flaxformer_lite.tasks.common import BOS, PAD, check_ints, check_seq_len, lm_example
from flaxformer_lite.tasks.copy import _FIRST, BLANK, DELIM, Copy

NOISE = BLANK  # the noise token of the region is the copy task's blank


class SelectiveCopy(Copy):
    """`copy` with the symbols scattered over the region: same vocabulary, display and chance."""
    name = 'selective_copy'
    DEFAULTS = dict(
        seq_len=96,  # model input length
        dependency_length=64,  # length of the noise region holding the symbols
        num_tokens=8,  # symbols to copy (Mamba: 16)
        num_symbols=8,  # data alphabet (Mamba: 16)
    )

    def _check(self, c: Mapping) -> None:
        check_ints(c, dict(seq_len=1, dependency_length=1, num_tokens=1, num_symbols=2))
        require(c['num_tokens'] <= c['dependency_length'], 'dependency_length',
                f"a region of {c['dependency_length']} tokens cannot hold {c['num_tokens']} "
                f"symbols; use task.dependency_length>={c['num_tokens']} or fewer task.num_tokens")
        check_seq_len(c, self.min_seq_len(c),
                      f"a region of dependency_length={c['dependency_length']} tokens and "
                      f"{c['num_tokens']} answers")

    @classmethod
    def min_seq_len(cls, cfg: Mapping) -> int:
        return cfg['dependency_length'] + cfg['num_tokens'] + 1

    def _generate(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        c = self.cfg
        k, region = c['num_tokens'], c['dependency_length']
        tokens = np.full(c['seq_len'] + 1, PAD, np.int32)
        data = _FIRST + rng.integers(0, c['num_symbols'], size=k)
        where = np.sort(rng.permutation(region)[:k])
        tokens[0] = BOS
        tokens[1:1 + region] = NOISE
        tokens[1 + where] = data
        delim = 1 + region
        tokens[delim] = DELIM
        tokens[delim + 1:delim + 1 + k] = data
        return lm_example(tokens, slice(delim, delim + k))
