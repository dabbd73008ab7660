"""Sequence to sequence: copy, reverse or sort a string of symbols, then stop.

    d a c b a  ->  a b c a d </s>     (mode=reverse)
    d a c b a  ->  a a b c d </s>     (mode=sort)

The translation-style setting with the cleanest dependency structure. Sutskever,
Vinyals & Le (2014) found that reversing the source made long sentences tractable
for LSTM encoder-decoders, because it shortens the distance between a target word and
its source: `reverse` asks the opposite, the first output depends on the last input.
Copy and sort are the algorithmic tasks of Graves et al. (2014, Neural Turing
Machines) and Vinyals et al. (2015, Pointer Networks). `dependency_length` is the
source length (exactly, or uniform in [1, it] with `variable_length`); targets end
with EOS and are padded. Evaluated by exact match of greedy autoregressive output.

Chance (exact match): a model that ignores the source content but sees its length
gets each symbol right with probability 1/num_symbols (copy, reverse); for sort it
can do no better than always emitting the most probable sorted multiset. Token
accuracy chance (copy, reverse): each symbol 1/num_symbols, EOS always right.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from flaxformer_lite.spec import TaskSpec
from flaxformer_lite.tasks.base import Task
from flaxformer_lite.tasks.common import (BOS, PAD, check_choice, check_ints, check_seq_len,
                                          pad_to)

EOS = 2
_FIRST = 3
MODES = ('copy', 'reverse', 'sort')


class Seq2Seq(Task):
    name = 'seq2seq'
    DEFAULTS = dict(
        seq_len=32,  # source length (padded); targets hold seq_len symbols + EOS
        dependency_length=16,  # source symbols (the longest, with variable_length)
        mode='reverse',  # copy | reverse | sort
        num_symbols=8,  # alphabet
        variable_length=False,  # source lengths uniform in [1, dependency_length]
    )

    def __init__(self, cfg: Mapping):
        super().__init__(cfg)
        c = self.cfg
        check_ints(c, dict(seq_len=1, dependency_length=1, num_symbols=2))
        check_choice(c, 'mode', MODES)
        check_choice(c, 'variable_length', (True, False))
        check_seq_len(c, self.min_seq_len(c), f"a source of {c['dependency_length']} symbols")
        self.vocab_size = _FIRST + c['num_symbols']

    @classmethod
    def min_seq_len(cls, cfg: Mapping) -> int:
        return cfg['dependency_length']

    @property
    def spec(self) -> TaskSpec:
        n = self.cfg['seq_len']
        return TaskSpec(kind='seq2seq', vocab_size=self.vocab_size, input_len=n, target_len=n + 1,
                        num_outputs=self.vocab_size, pad_id=PAD, bos_id=BOS)

    def lengths(self) -> np.ndarray:
        """The source lengths examples take (each equally likely)."""
        d = self.cfg['dependency_length']
        return np.arange(1, d + 1) if self.cfg['variable_length'] else np.array([d])

    def _generate(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        c = self.cfg
        n = int(rng.choice(self.lengths())) if c['variable_length'] else c['dependency_length']
        source = _FIRST + rng.integers(0, c['num_symbols'], size=n)
        out = {'copy': source, 'reverse': source[::-1], 'sort': np.sort(source)}[c['mode']]
        targets = pad_to(np.append(out, EOS), c['seq_len'] + 1)
        weights = np.zeros(c['seq_len'] + 1, np.float32)
        weights[:n + 1] = 1.0
        return dict(inputs=pad_to(source, c['seq_len']), targets=targets, weights=weights)

    def _name(self, token: int) -> str:
        if token == EOS:
            return '</s>'
        k = int(token) - _FIRST
        return chr(ord('a') + k) if self.cfg['num_symbols'] <= 26 else str(k)

    def decode(self, example: Mapping[str, np.ndarray]) -> tuple[str, str]:
        source = ' '.join(self._name(t) for t in example['inputs'] if t != PAD)
        target = ' '.join(self._name(t) for t in example['targets'][example['weights'] > 0])
        return source, target

    def tokens_text(self, tokens: np.ndarray) -> str:
        """The decoded target up to and including its EOS."""
        tokens = list(np.asarray(tokens))
        return super().tokens_text(tokens[:tokens.index(EOS) + 1] if EOS in tokens else tokens)

    def chance(self) -> dict[str, float]:
        v, lengths = self.cfg['num_symbols'], self.lengths()
        if self.cfg['mode'] == 'sort':
            return {'exact_match': float(np.mean([_best_multiset(n, v) for n in lengths]))}
        return {'exact_match': float(np.mean([v ** -float(n) for n in lengths])),
                'accuracy': float(np.sum(lengths / v + 1) / np.sum(lengths + 1))}


def _best_multiset(n: int, v: int) -> float:
    """Probability of the most likely sorted string of n uniform draws from v symbols:
    the multinomial at the most even counts, n! / prod(c_i!) / v^n."""
    q, r = divmod(n, v)
    counts = [q + 1] * r + [q] * (v - r)
    log_p = math.lgamma(n + 1) - sum(math.lgamma(c + 1) for c in counts) - n * math.log(v)
    return math.exp(log_p)
