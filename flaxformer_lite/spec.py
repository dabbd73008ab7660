"""The shared leaf: what both `models/` and `tasks/` need to know of each other.

A task describes its data with a `TaskSpec`; a model family builds the shape that spec
asks for. Neither side imports the other: both import this module (and `errors.py`).
"""

from __future__ import annotations

import dataclasses

KINDS = ('lm', 'seq2seq', 'mlm', 'classify', 'regress')


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """What a model builder needs to know about a task's data.

    kind: 'lm' (per-position next-token targets on `inputs`), 'seq2seq' (`inputs` ->
      `targets`, decoded autoregressively), 'mlm' (per-position targets of the masked
      positions of `inputs`, read in both directions), 'classify' (one class per sequence) or
      'regress' (one float per sequence).
    vocab_size: input token vocabulary, specials included.
    input_len: length of `inputs`.
    target_len: length of `targets` for lm / seq2seq / mlm; 1 for classify / regress.
    num_outputs: output vocabulary (lm, seq2seq, mlm), classes (classify) or 1 (regress).
    """
    kind: str
    vocab_size: int
    input_len: int
    target_len: int
    num_outputs: int
    pad_id: int = 0
    bos_id: int = 1  # decoder start token of seq2seq targets

    def __post_init__(self):
        assert self.kind in KINDS, self.kind
