"""Byte-level language modelling over text files the user names.

`task.files` is a glob or a tuple of globs ('~/books/*.txt', ('a.txt', 'src/**/*.py')).
Unset, the Python standard library's own top-level `.py` sources (the directory of
`os`) are the corpus: real, multi-megabyte text present on every machine with Python.
It changes with the Python version, so name files for runs compared across machines.

The files are concatenated (one newline between them) and cut into non-overlapping
chunks of seq_len + 1 bytes; a chunk gives inputs = chunk[:-1], targets = chunk[1:],
every position counted. Each chunk goes to the split its content hash names
(`base.split_of`), so the splits are disjoint and stable whatever the file order, and
example i of a split is chunk i of that split (modulo its size). Tokens are the bytes
themselves (vocabulary 256); text holds no NUL, so pad id 0 never collides.
`report_loss_by_position` asks the trainer to log loss against context position:
how much further context helps is the long-range question for real text.
Chance: always predicting the most frequent byte of the training chunks.

`objective=mlm` turns the same chunks (their first seq_len bytes, the same splits) into
masked-language modelling (Devlin et al. 2019, BERT): `mask_rate` of the positions
(rounded, at least one) are chosen, and of those 80% become the mask token (id 256, so
the vocabulary is 257), 10% a random byte and 10% stay; the targets are the original
bytes and only the chosen positions count (`weights`). The choice is a function of
(task.seed, split, example index), and training indices run past the split's size,
so each pass over the training chunks masks them anew (RoBERTa's dynamic masking) while
the evaluation examples stay the same.
"""

from __future__ import annotations

import glob
import os
from typing import Mapping

import numpy as np

from flaxformer_lite.errors import ConfigError, UserError
from flaxformer_lite.spec import TaskSpec
from flaxformer_lite.tasks.base import SPLITS, Task, require, split_of
from flaxformer_lite.tasks.common import PAD, as_patterns, check_choice, check_ints, read_text, resolve_files

MASK = 256  # objective=mlm: the mask token, one past the bytes
_CACHE: dict[tuple, tuple[np.ndarray, dict[str, np.ndarray]]] = {}
_CACHE_SIZE = 4


def default_files() -> list[str]:
    """The standard library's top-level .py files."""
    return sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), '*.py')))


class TextLM(Task):
    name = 'text_lm'
    report_loss_by_position = True
    DEFAULTS = dict(
        seq_len=128,  # bytes of context per example
        files=None,  # glob or tuple of globs of text files; unset: the stdlib's .py sources
        objective='lm',  # lm: next byte (decoder-only models) | mlm: masked bytes (encoder_mlm)
        mask_rate=0.15,  # mlm: share of positions chosen for prediction
    )

    def __init__(self, cfg: Mapping):
        super().__init__(cfg)
        c = self.cfg
        c.setdefault('files', None)
        c.setdefault('objective', 'lm')
        c.setdefault('mask_rate', 0.15)
        check_ints(c, dict(seq_len=1))
        check_choice(c, 'objective', ('lm', 'mlm'))
        require(isinstance(c['mask_rate'], (int, float)) and 0.0 < c['mask_rate'] <= 1.0, 'mask_rate',
                f"is {c['mask_rate']!r}; use a share of positions in (0, 1], e.g. 0.15")
        patterns = as_patterns(c['files'])
        paths = resolve_files(patterns) if patterns else default_files()
        self.paths = paths
        key = (tuple(paths), tuple(_stamp(p) for p in paths), c['seq_len'], bool(patterns))
        if key not in _CACHE:
            while len(_CACHE) >= _CACHE_SIZE:
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[key] = _chunk(_corpus(paths, strict=bool(patterns)), c['seq_len'])
        self.chunks, self.index = _CACHE[key]

    @property
    def spec(self) -> TaskSpec:
        n = self.cfg['seq_len']
        if self.cfg['objective'] == 'mlm':
            return TaskSpec(kind='mlm', vocab_size=MASK + 1, input_len=n, target_len=n, num_outputs=MASK + 1,
                            pad_id=PAD)
        return TaskSpec(kind='lm', vocab_size=256, input_len=n, target_len=n, num_outputs=256,
                        pad_id=PAD)

    def num_examples(self, split: str) -> int:
        return len(self.index[split])

    def example(self, split: str, index: int) -> dict[str, np.ndarray]:
        """Chunk `index` of the split (modulo its size)."""
        ids = self.index[split]
        chunk = self.chunks[ids[int(index) % len(ids)]].astype(np.int32)
        if self.cfg['objective'] == 'mlm':
            return self._masked(chunk[:-1], np.random.default_rng([self.seed, SPLITS.index(split), int(index)]))
        return dict(inputs=chunk[:-1], targets=chunk[1:],
                    weights=np.ones(self.cfg['seq_len'], np.float32))

    def _masked(self, seq: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """BERT's corruption of one sequence: 80% mask token, 10% random byte, 10% kept."""
        n = len(seq)
        chosen = rng.choice(n, max(1, round(self.cfg['mask_rate'] * n)), replace=False)
        inputs, draw = seq.copy(), rng.random(len(chosen))
        inputs[chosen[draw < 0.8]] = MASK
        swapped = chosen[(draw >= 0.8) & (draw < 0.9)]
        inputs[swapped] = rng.integers(1, 256, len(swapped))  # 1..255: never the pad id
        weights = np.zeros(n, np.float32)
        weights[chosen] = 1.0
        return dict(inputs=inputs, targets=seq.copy(), weights=weights)

    def _generate(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        raise NotImplementedError('text_lm reads its examples from files')

    def decode(self, example: Mapping[str, np.ndarray]) -> tuple[str, str]:
        def text(tokens: np.ndarray) -> str:  # the mask token shows as U+2588 (a full block)
            pieces = np.split(tokens, np.flatnonzero(tokens == MASK))
            return '\u2588'.join(bytes(p[p != MASK].astype(np.uint8)).decode('utf-8', 'replace') for p in pieces)
        return text(example['inputs']), text(example['targets'])

    def prompt_tokens(self, text: str) -> np.ndarray:
        """The prompt's UTF-8 bytes (a NUL would be the pad token)."""
        data = np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32)
        if (data == PAD).any():
            raise UserError('--prompt holds a NUL byte, which is the pad token of text_lm; remove it')
        return data

    def tokens_text(self, tokens: np.ndarray) -> str:
        return bytes(np.asarray(tokens, np.uint8)).decode('utf-8', 'replace')

    def chance(self) -> dict[str, float]:
        counts = np.bincount(self.chunks[self.index['train'], 1:].ravel(), minlength=256)
        return {'accuracy': float(counts.max() / counts.sum())}


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _corpus(paths: list[str], strict: bool) -> np.ndarray:
    """All files' bytes; a bad file named by the user is an error, a bad default one
    is skipped."""
    parts = []
    for path in paths:
        try:
            parts.append(read_text(path))
        except ConfigError:
            if strict:
                raise
    return np.frombuffer(b'\n'.join(parts), np.uint8)


def _chunk(data: np.ndarray, seq_len: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Non-overlapping chunks of seq_len + 1 bytes and the chunk ids of each split."""
    size = seq_len + 1
    count = len(data) // size
    require(count >= 30, 'files',
            f"the corpus holds {len(data)} bytes: {count} chunks of seq_len+1={size}, too few "
            f"to fill train / eval / test; name more text or use a shorter task.seq_len")
    chunks = data[:count * size].reshape(count, size)
    wide = chunks.astype(np.int32)
    names = np.array([SPLITS.index(split_of(dict(inputs=row[:-1], targets=row[1:]))) for row in wide])
    index = {split: np.flatnonzero(names == i) for i, split in enumerate(SPLITS)}
    for split, ids in index.items():
        require(len(ids) > 0, 'files',
                f"no chunk of the corpus ({len(data)} bytes) falls in split '{split}'; name "
                f"more text or use a shorter task.seq_len")
    return chunks, index
