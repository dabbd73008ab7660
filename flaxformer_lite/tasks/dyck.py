"""Dyck: is a string of brackets of `num_types` kinds balanced (depth <= max_depth)?

    ( [ ] ( ) )   -> balanced        ( [ ) ( ] )   -> not (two brackets swapped)

Dyck languages are the core of context-free structure (Chomsky & Schützenberger
1963); Yao et al. (2021, "Self-attention networks can process bounded hierarchical
languages") study the bounded-depth form Dyck-(k, D) used here, and Delétang et al.
(2023) use Dyck-style recognition for length generalisation. Positives are random
walks that stay within `max_depth`. Negatives are near misses: a positive with two
different brackets swapped (redrawn until unbalanced), so length, the count of each
bracket, and often the depth profile are all those of a balanced string; only
matching brackets by type and position tells them apart. `dependency_length` is the
string length (even); padding follows. Classes are drawn 50/50, so chance is 0.5.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from flaxformer_lite.spec import TaskSpec
from flaxformer_lite.tasks.base import Task, require
from flaxformer_lite.tasks.common import PAD, check_ints, check_seq_len, classify_example

PAIRS = ('()', '[]', '{}', '<>')
_FIRST = 2  # open of type t: _FIRST + 2 t; its close: _FIRST + 2 t + 1


def balanced(tokens: list[int]) -> bool:
    """Every close matches the most recent unmatched open of its type, none left open."""
    stack: list[int] = []
    for t in tokens:
        if (t - _FIRST) % 2 == 0:
            stack.append(t + 1)
        elif not stack or stack.pop() != t:
            return False
    return not stack


class Dyck(Task):
    name = 'dyck'
    DEFAULTS = dict(
        seq_len=64,  # model input length
        dependency_length=32,  # brackets per string (even)
        num_types=2,  # bracket kinds, at most 4: () [] {} <>
        max_depth=8,  # nesting bound of the positives
    )

    def __init__(self, cfg: Mapping):
        super().__init__(cfg)
        c = self.cfg
        check_ints(c, dict(seq_len=2, dependency_length=2, num_types=1, max_depth=1))
        require(c['dependency_length'] % 2 == 0, 'dependency_length',
                f"is {c['dependency_length']}; balanced strings have even length, use an even value")
        require(c['num_types'] <= len(PAIRS), 'num_types',
                f"is {c['num_types']}; at most {len(PAIRS)} bracket kinds are defined")
        check_seq_len(c, self.min_seq_len(c), f"{c['dependency_length']} brackets")

    @classmethod
    def min_seq_len(cls, cfg: Mapping) -> int:
        return cfg['dependency_length']

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec(kind='classify', vocab_size=_FIRST + 2 * self.cfg['num_types'],
                        input_len=self.cfg['seq_len'], target_len=1, num_outputs=2, pad_id=PAD)

    def _positive(self, rng: np.random.Generator) -> list[int]:
        n, cap = self.cfg['dependency_length'], self.cfg['max_depth']
        u = rng.random(n).tolist()
        types = rng.integers(0, self.cfg['num_types'], size=n).tolist()
        out, stack = [], []
        for i in range(n):
            depth = len(stack)
            if depth and (depth == n - i or depth == cap or u[i] < 0.5):
                out.append(stack.pop())
            else:
                t = _FIRST + 2 * types[i]
                out.append(t)
                stack.append(t + 1)
        return out

    def _generate(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        tokens = self._positive(rng)
        label = int(rng.random() < 0.5)
        if not label:
            tokens = _near_miss(rng, tokens)
        return classify_example(np.array(tokens), self.cfg['seq_len'], label)

    def decode(self, example: Mapping[str, np.ndarray]) -> tuple[str, str]:
        text = ' '.join(PAIRS[(t - _FIRST) // 2][(t - _FIRST) % 2] for t in example['inputs'] if t != PAD)
        return text, ('balanced' if int(example['targets']) else 'unbalanced')

    def chance(self) -> dict[str, float]:
        return {'accuracy': 0.5}


def _near_miss(rng: np.random.Generator, tokens: list[int], tries: int = 16) -> list[int]:
    """Swap two different brackets until the string is unbalanced; falls back to
    swapping the first bracket (an open) with a close, which always is."""
    n = len(tokens)
    pairs = rng.integers(0, n, size=(tries, 2)).tolist()
    for i, j in pairs:
        if tokens[i] != tokens[j]:
            out = list(tokens)
            out[i], out[j] = out[j], out[i]
            if not balanced(out):
                return out
    closes = [k for k, t in enumerate(tokens) if (t - _FIRST) % 2]
    j = closes[int(rng.integers(0, len(closes)))]
    out = list(tokens)
    out[0], out[j] = out[j], out[0]
    return out
