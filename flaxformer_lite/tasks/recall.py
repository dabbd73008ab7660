"""Associative recall: key-value pairs, a gap of noise, then queries of earlier keys.

    ^ . . k3 v7 k9 v1 k0 v4 . . . . . . k9 v1 k3 v7
             \\______ pairs ______/ \\_ gap _/ \\_ queries _/

As language modelling: the model reads the stream and, at each query key, must predict
the value that followed the same key in the pairs block. Only those answer positions
count in the loss and the metrics. `dependency_length` is the distance from the last
pair to the first query, so every queried pair is at least that far back; queries come
in random order, so no fixed offset solves the task. Chance: 1 / num_values.

`shuffle_answers=True` is the control task (in the spirit of Hewitt & Liang 2019): each
answer is a value drawn independently of its key, so nothing in the context predicts it
and every model must stay at chance; a model that beats chance there learned something
other than the dependency (or the metric is broken).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from flaxformer_lite.tasks.base import LMTask, require
from flaxformer_lite.tasks.common import BOS, PAD

_FIRST = 2  # first non-special token id


class KeyValueTask(LMTask):
    """Vocabulary, display and chance shared by the associative-recall tasks:
    specials, then keys, values and noise tokens. Chance: 1 / num_values."""

    def _layout(self, num_keys: int, num_values: int, num_noise: int) -> None:
        self.keys0 = _FIRST
        self.values0 = self.keys0 + num_keys
        self.noise0 = self.values0 + num_values
        self.vocab_size = self.noise0 + num_noise

    def _name(self, token: int) -> str:
        if token == BOS:
            return '^'
        if token == PAD:
            return '_'
        if token < self.values0:
            return f'k{token - self.keys0}'
        if token < self.noise0:
            return f'v{token - self.values0}'
        return '.'

    def chance(self) -> dict[str, float]:
        return {'accuracy': 1.0 / self.cfg['num_values']}


class Recall(KeyValueTask):
    name = 'recall'
    DEFAULTS = dict(
        seq_len=64,  # model input length
        dependency_length=16,  # tokens from the last pair to the first query (>= 1)
        num_pairs=8,  # key-value pairs shown
        num_queries=4,  # keys asked about (distinct pairs, random order)
        num_keys=32,  # key vocabulary (pairs use distinct keys)
        num_values=32,  # value vocabulary
        num_noise=8,  # filler vocabulary of the gap
        shuffle_answers=False,  # control: answers independent of their keys (chance is the ceiling)
    )

    def __init__(self, cfg: Mapping):
        super().__init__(cfg)
        c = self.cfg
        for field in ('num_pairs', 'num_queries', 'num_keys', 'num_values', 'num_noise'):
            require(c[field] >= 1, field, 'must be at least 1')
        require(c['dependency_length'] >= 1, 'dependency_length', 'must be at least 1')
        require(c['num_pairs'] <= c['num_keys'], 'num_pairs',
                f"{c['num_pairs']} pairs need distinct keys but num_keys={c['num_keys']}; "
                f"raise task.num_keys or lower task.num_pairs")
        require(c['num_queries'] <= c['num_pairs'], 'num_queries',
                f"cannot ask {c['num_queries']} distinct queries of {c['num_pairs']} pairs")
        need = self.min_seq_len(c)
        require(c['seq_len'] >= need, 'seq_len',
                f"seq_len={c['seq_len']} cannot hold {c['num_pairs']} pairs, a gap of "
                f"dependency_length={c['dependency_length']} and {c['num_queries']} queries; "
                f"use task.seq_len>={need} or a shorter task.dependency_length")
        self._layout(c['num_keys'], c['num_values'], c['num_noise'])

    @classmethod
    def min_seq_len(cls, cfg: Mapping) -> int:
        return 2 * cfg['num_pairs'] + cfg['dependency_length'] + 2 * cfg['num_queries'] - 1

    def _generate(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        c = self.cfg
        n, q, gap, length = c['num_pairs'], c['num_queries'], c['dependency_length'], c['seq_len']
        tokens = self.noise0 + rng.integers(0, c['num_noise'], size=length + 1)
        tokens[0] = BOS
        keys = self.keys0 + rng.choice(c['num_keys'], size=n, replace=False)
        values = self.values0 + rng.integers(0, c['num_values'], size=n)
        start = length - self.min_seq_len(c) + 1  # >= 1: after BOS
        tokens[start:start + 2 * n:2] = keys
        tokens[start + 1:start + 2 * n:2] = values
        asked = rng.choice(n, size=q, replace=False)
        first_query = start + 2 * n - 1 + gap
        tokens[first_query:first_query + 2 * q:2] = keys[asked]
        answers = values[asked]
        if c['shuffle_answers']:
            answers = self.values0 + rng.integers(0, c['num_values'], size=q)
        tokens[first_query + 1:first_query + 2 * q:2] = answers
        weights = np.zeros(length, np.float32)
        weights[first_query:first_query + 2 * q:2] = 1.0  # targets[i] = tokens[i + 1]
        return dict(inputs=tokens[:-1].astype(np.int32), targets=tokens[1:].astype(np.int32),
                    weights=weights)
