"""Parity: is the number of ones in a bit string odd?

    1 0 1 1 0 0 1 0  ->  odd (1)

The canonical regular language no finite-precision soft-attention Transformer
represents at all lengths (Hahn 2020, "Theoretical limitations of self-attention"),
yet a two-state recurrent network solves it; Delétang et al. (2023, "Neural networks
and the Chomsky hierarchy") use it for length generalisation. Every bit matters, so
`dependency_length` is the string length (exactly, or uniform in [1, it] with
`variable_length`, as Delétang et al. train). Bits are uniform, so chance is 0.5.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from flaxformer_lite.spec import TaskSpec
from flaxformer_lite.tasks.base import Task
from flaxformer_lite.tasks.common import PAD, check_choice, check_ints, check_seq_len, classify_example

ZERO, ONE = 2, 3


class Parity(Task):
    name = 'parity'
    DEFAULTS = dict(
        seq_len=64,  # model input length
        dependency_length=32,  # bits per string (the longest, with variable_length)
        variable_length=False,  # lengths uniform in [1, dependency_length]
    )

    def __init__(self, cfg: Mapping):
        super().__init__(cfg)
        c = self.cfg
        check_ints(c, dict(seq_len=1, dependency_length=1))
        check_choice(c, 'variable_length', (True, False))
        check_seq_len(c, self.min_seq_len(c), f"{c['dependency_length']} bits")

    @classmethod
    def min_seq_len(cls, cfg: Mapping) -> int:
        return cfg['dependency_length']

    def with_dependency_length(self, length: int) -> 'Parity':
        """Evaluation at another length uses strings of exactly that length, also when
        training draws variable lengths: a length-generalisation score must not be
        propped up by the short strings of a variable-length set."""
        other = super().with_dependency_length(length)
        return type(self)(dict(other.cfg, variable_length=False))

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec(kind='classify', vocab_size=ONE + 1, input_len=self.cfg['seq_len'],
                        target_len=1, num_outputs=2, pad_id=PAD)

    def _generate(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        n = self.cfg['dependency_length']
        if self.cfg['variable_length']:
            n = int(rng.integers(1, n + 1))
        bits = rng.integers(0, 2, size=n)
        return classify_example(ZERO + bits, self.cfg['seq_len'], int(bits.sum() % 2))

    def decode(self, example: Mapping[str, np.ndarray]) -> tuple[str, str]:
        bits = ''.join('01'[t - ZERO] for t in example['inputs'] if t != PAD)
        return bits, ('odd' if int(example['targets']) else 'even')

    def chance(self) -> dict[str, float]:
        return {'accuracy': 0.5}
