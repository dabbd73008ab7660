"""Subject-verb number agreement across distractors, over a small generated grammar.

    the old key near the cabinets that the pilots met  ->  is   (singular)
        \\subj/ \\_______ dependency_length = 8 words _______/

Linzen, Dupoux & Goldberg (2016, "Assessing the ability of LSTMs to learn
syntax-sensitive dependencies"): to choose 'is' or 'are' a model must find the subject
across intervening words, and nouns of the other number in between (attractors)
mislead models that track the last noun. Between the subject and the verb go exactly
`dependency_length` words: prepositional phrases ('near the cats', 3 words), relative
clauses ('that chased the dog' / 'that the dogs saw', 4 words; `relative_clauses`),
adjectives inside those noun phrases, and adverbs when there is no room for a phrase.
Attractors take a random number (`attractors='random'`) or always the other one
(`'opposite'`, the hard case of Linzen et al.). Only the subject and the nouns carry
number ('the' is shared), so nothing else gives the answer away.

mode='classify': the words before the verb -> singular (0) / plural (1).
mode='lm': the whole sentence; only the prediction of the verb (is / are) counts.
Chance: 0.5 (subjects are singular or plural with equal probability).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from flaxformer_lite.spec import TaskSpec
from flaxformer_lite.tasks.base import Task
from flaxformer_lite.tasks.common import (BOS, PAD, check_choice, check_ints, check_seq_len,
                                          classify_example, lm_example)

NOUNS = (('cat', 'cats'), ('dog', 'dogs'), ('key', 'keys'), ('author', 'authors'),
         ('farmer', 'farmers'), ('bird', 'birds'), ('teacher', 'teachers'),
         ('child', 'children'), ('box', 'boxes'), ('painting', 'paintings'),
         ('pilot', 'pilots'), ('cabinet', 'cabinets'))
ADJECTIVES = ('old', 'small', 'red', 'quiet', 'famous', 'clever')
PREPOSITIONS = ('near', 'behind', 'beside', 'with', 'above')
VERBS_PAST = ('saw', 'chased', 'liked', 'followed', 'helped', 'met')  # no number marking
ADVERBS = ('probably', 'certainly', 'still')
WORDS = (('<pad>', '<s>', 'the', 'that', 'is', 'are', '.') + tuple(w for pair in NOUNS for w in pair)
         + ADJECTIVES + PREPOSITIONS + VERBS_PAST + ADVERBS)
ID = {w: i for i, w in enumerate(WORDS)}
THE, THAT, IS, ARE, STOP = ID['the'], ID['that'], ID['is'], ID['are'], ID['.']
NOUN0 = ID[NOUNS[0][0]]  # noun n, number b: NOUN0 + 2 n + b
ADJ = np.array([ID[w] for w in ADJECTIVES])
PREP = np.array([ID[w] for w in PREPOSITIONS])
VERB = np.array([ID[w] for w in VERBS_PAST])
ADV = np.array([ID[w] for w in ADVERBS])


class Agreement(Task):
    name = 'agreement'
    DEFAULTS = dict(
        seq_len=32,  # model input length
        dependency_length=12,  # words between the subject noun and the verb
        mode='classify',  # classify | lm
        relative_clauses=True,  # allow 'that ...' clauses besides prepositional phrases
        attractors='random',  # random | opposite: the number of the intervening nouns
    )

    def __init__(self, cfg: Mapping):
        super().__init__(cfg)
        c = self.cfg
        check_ints(c, dict(seq_len=1, dependency_length=0))
        check_choice(c, 'mode', ('classify', 'lm'))
        check_choice(c, 'attractors', ('random', 'opposite'))
        check_choice(c, 'relative_clauses', (True, False))
        check_seq_len(c, self.min_seq_len(c),
                      f"a sentence with dependency_length={c['dependency_length']} words between "
                      f"subject and verb")

    @classmethod
    def min_seq_len(cls, cfg: Mapping) -> int:
        # <s> the ADJ noun [dependency] (+ verb ADJ . in lm mode, inputs drop the last)
        return cfg['dependency_length'] + (6 if cfg.get('mode') == 'lm' else 4)

    @property
    def spec(self) -> TaskSpec:
        n = self.cfg['seq_len']
        if self.cfg['mode'] == 'lm':
            return TaskSpec(kind='lm', vocab_size=len(WORDS), input_len=n, target_len=n,
                            num_outputs=len(WORDS), pad_id=PAD, bos_id=BOS)
        return TaskSpec(kind='classify', vocab_size=len(WORDS), input_len=n, target_len=1,
                        num_outputs=2, pad_id=PAD)

    def _generate(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        c = self.cfg
        left = c['dependency_length']
        u = iter(rng.random(4 * left + 8).tolist())

        def pick(options) -> int:
            return int(options[int(next(u) * len(options))])

        def noun(plural: int) -> int:
            return NOUN0 + 2 * int(next(u) * len(NOUNS)) + plural

        plural = int(next(u) < 0.5)
        words = [BOS, THE] + ([pick(ADJ)] if next(u) < 0.5 else []) + [noun(plural)]
        opposite = c['attractors'] == 'opposite'
        pieces, noun_phrases = [], []  # noun_phrases: (piece, index of its 'the')
        while left >= 3:
            number = 1 - plural if opposite else int(next(u) < 0.5)
            kind = int(next(u) * (3 if c['relative_clauses'] and left >= 4 else 1))
            if kind == 0:  # near the N
                piece = [pick(PREP), THE, noun(number)]
                noun_phrases.append((piece, 1))
            elif kind == 1:  # that chased the N
                piece = [THAT, pick(VERB), THE, noun(number)]
                noun_phrases.append((piece, 2))
            else:  # that the N saw
                piece = [THAT, THE, noun(number), pick(VERB)]
                noun_phrases.append((piece, 1))
            pieces.append(piece)
            left -= len(piece)
        adverbs = []
        for _ in range(left):  # 0-2 words left: adjectives in a phrase, else adverbs
            if noun_phrases:
                piece, at = noun_phrases[int(next(u) * len(noun_phrases))]
                piece.insert(at + 1, pick(ADJ))
            else:
                adverbs.append(pick(ADV))
        for piece in pieces:
            words.extend(piece)
        words.extend(adverbs)
        if c['mode'] == 'classify':
            return classify_example(np.array(words), c['seq_len'], plural)
        verb_at = len(words) - 1  # predicting words[verb_at + 1]
        words += [ARE if plural else IS, pick(ADJ), STOP]
        tokens = np.zeros(c['seq_len'] + 1, np.int32)
        tokens[:len(words)] = words
        return lm_example(tokens, [verb_at])

    def _name(self, token: int) -> str:
        return WORDS[token]

    def decode(self, example: Mapping[str, np.ndarray]) -> tuple[str, str]:
        text = ' '.join(WORDS[t] for t in example['inputs'] if t not in (PAD, BOS))
        if self.cfg['mode'] == 'classify':
            return text, ('plural' if int(example['targets']) else 'singular')
        return text, ' '.join(WORDS[t] for t in example['targets'][example['weights'] > 0])

    def chance(self) -> dict[str, float]:
        return {'accuracy': 0.5}
