"""Multi-query associative recall (MQAR), as in Zoology.

    ^ k3 v7 k9 v1 k0 v4 . . . . k9 v1 . . k0 v4 . k3 v7 . . . .
      \\___ pairs ___/ \\ gap /  \\____ queries, power-law spaced ____/

Arora et al. (2023, "Zoology: measuring and improving recall in efficient language
models") show that the gap between attention and gated-convolution / recurrent models
is mostly this: recalling many key-value bindings from context. Every one of the
`num_pairs` keys (distinct, as are the values) is queried once, in random order; query
slots follow Zoology's power law p(g) ~ g^(a-1) (a = `power_a`) over the even offsets
of the query region, so most queries come early and a few late. As language
modelling, the model must predict the value after each query key; only those
positions count. `dependency_length` (the query distance) is the gap of noise between
the last pair and the query region, so every query is at least that far from its
pair. Chance: 1 / num_values.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from flaxformer_lite.tasks.base import require
from flaxformer_lite.tasks.common import BOS, check_ints, check_seq_len, gumbel_topk, lm_example
from flaxformer_lite.tasks.recall import KeyValueTask


class MQAR(KeyValueTask):
    name = 'mqar'
    DEFAULTS = dict(
        seq_len=128,  # model input length (Zoology: 64-512)
        dependency_length=16,  # noise tokens between the last pair and the query region
        num_pairs=16,  # key-value pairs, each queried once (Zoology: 4-64)
        num_keys=64,  # key vocabulary
        num_values=64,  # value vocabulary
        num_noise=8,  # filler vocabulary
        power_a=0.01,  # query spacing law p(g) ~ g^(a-1) (Zoology's default)
    )

    def __init__(self, cfg: Mapping):
        super().__init__(cfg)
        c = self.cfg
        check_ints(c, dict(seq_len=1, dependency_length=0, num_pairs=1, num_keys=1,
                           num_values=1, num_noise=1))
        require(isinstance(c['power_a'], (int, float)) and c['power_a'] > 0, 'power_a',
                f"is {c['power_a']!r}; use a positive number (Zoology: 0.01)")
        for vocab in ('num_keys', 'num_values'):
            require(c['num_pairs'] <= c[vocab], 'num_pairs',
                    f"{c['num_pairs']} pairs need distinct {vocab[4:]} but {vocab}={c[vocab]}; "
                    f"raise task.{vocab} or lower task.num_pairs")
        check_seq_len(c, self.min_seq_len(c),
                      f"{c['num_pairs']} pairs, a gap of dependency_length={c['dependency_length']} "
                      f"and {c['num_pairs']} query slots")
        self._layout(c['num_keys'], c['num_values'], c['num_noise'])
        self.space = (c['seq_len'] - 2 * c['num_pairs'] - c['dependency_length']) // 2
        g = np.arange(1, self.space + 1, dtype=np.float64)
        self.log_p = (float(c['power_a']) - 1.0) * np.log(g)

    @classmethod
    def min_seq_len(cls, cfg: Mapping) -> int:
        return 4 * cfg['num_pairs'] + cfg['dependency_length']

    def _generate(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        c = self.cfg
        k, length = c['num_pairs'], c['seq_len']
        tokens = self.noise0 + rng.integers(0, c['num_noise'], size=length + 1)
        tokens[0] = BOS
        keys = self.keys0 + rng.permutation(c['num_keys'])[:k]
        values = self.values0 + rng.permutation(c['num_values'])[:k]
        tokens[1:1 + 2 * k:2] = keys
        tokens[2:2 + 2 * k:2] = values
        slots = 1 + 2 * k + c['dependency_length'] + 2 * gumbel_topk(rng, self.log_p, k)
        asked = rng.permutation(k)
        tokens[slots] = keys[asked]
        tokens[slots + 1] = values[asked]
        return lm_example(tokens, slots)
