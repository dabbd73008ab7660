"""Reader of ListOps TSV files in the Long Range Arena release format.

    Source\tTarget
    ( ( ( ( [MAX 2 ) 9 ) ( ( [MIN 4 ) 7 ) ] ) ] )\t9

Splits: when every file's name holds a split word (LRA ships `basic_train.tsv`,
`basic_val.tsv`, `basic_test.tsv`) the files keep their split: train, val / dev /
eval -> eval, test; a row that also occurs in a later split (test before eval before
train) is dropped from the earlier one, so the splits stay disjoint. Otherwise every
row goes to the split its content hash names (`base.split_of`), as generated examples
do. Every row is checked when the task is built, so a bad file fails before training.
"""

from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np

from flaxformer_lite.errors import ConfigError
from flaxformer_lite.tasks.base import SPLITS, require, split_of
from flaxformer_lite.tasks.common import classify_example, read_text, resolve_files
from flaxformer_lite.tasks.listops_vocab import END, OP0, VOCAB

_SPLIT_WORDS = (('test', 'test'), ('val', 'eval'), ('dev', 'eval'), ('eval', 'eval'),
                ('train', 'train'))

Rows = dict[str, tuple[list[np.ndarray], np.ndarray]]


def file_split(path: str) -> str | None:
    """The split a file's name claims, if any ('basic_val.tsv' -> 'eval')."""
    words = set(re.split(r'[^a-z]+', os.path.basename(path).lower()))
    return next((split for word, split in _SPLIT_WORDS if word in words), None)


def parse_row(source: str, target: str, where: str, seq_len: int) -> tuple[np.ndarray, int]:
    """Token ids and value of one row; ConfigError naming task.files if unreadable."""
    label = target.strip()
    require(len(label) == 1 and label.isdigit(), 'files',
            f"{where}: target {target.strip()!r} is not a digit 0-9; fix or remove the row")
    words = [w for w in source.split() if w not in ('(', ')')]
    unknown = [w for w in words if w not in VOCAB]
    require(not unknown, 'files',
            f"{where}: unknown token {unknown[:1][0] if unknown else ''!r} (expected digits, "
            f"[MIN [MAX [MED [SM, ] and parentheses); fix or remove the row")
    tokens = np.array([VOCAB[w] for w in words], np.int8)
    is_op = (tokens >= OP0) & (tokens < END)
    depth = np.cumsum(is_op.astype(np.int32) - (tokens == END))
    well_formed = (len(tokens) >= 3 and bool(is_op[0]) and depth[-1] == 0
                   and bool(np.all(depth[:-1] > 0)))
    require(well_formed, 'files',
            f"{where}: the expression is not one bracketed operator expression "
            f"(unbalanced '[OP ... ]'); fix or remove the row")
    require(len(tokens) <= seq_len, 'seq_len',
            f"{where}: the expression has {len(tokens)} tokens (parentheses dropped) but "
            f"seq_len={seq_len}; use task.seq_len>={len(tokens)}")
    return tokens, int(label)


def read_tsv(path: str, seq_len: int) -> tuple[list[np.ndarray], list[int]]:
    data = read_text(path)
    try:
        text = data.decode('utf-8')
    except UnicodeDecodeError:
        raise ConfigError(f"task.files: '{path}' is not UTF-8 text; name LRA-format TSV files "
                          f"in task.files") from None
    lines = text.splitlines()
    first = 1 if [f.strip() for f in lines[0].split('\t')] == ['Source', 'Target'] else 0
    tokens, labels = [], []
    for number, line in enumerate(lines[first:], first + 1):
        if not line.strip():
            continue
        fields = line.split('\t')
        where = f"'{path}' line {number}"
        require(len(fields) == 2, 'files',
                f"{where}: expected 2 tab-separated fields (Source, Target), found "
                f"{len(fields)}; fix or remove the row")
        row, label = parse_row(fields[0], fields[1], where, seq_len)
        tokens.append(row)
        labels.append(label)
    require(bool(labels), 'files', f"'{path}' holds no rows; remove it from task.files")
    return tokens, labels


def load(patterns: Sequence[str], seq_len: int) -> Rows:
    """Rows of the files by split: {split: (token arrays, labels)}."""
    paths = resolve_files(patterns)
    claimed = [file_split(p) for p in paths]
    by_file = all(claimed)
    buckets: dict[str, list[tuple[np.ndarray, int]]] = {s: [] for s in SPLITS}
    for path, split in zip(paths, claimed):
        for row, label in zip(*read_tsv(path, seq_len)):
            if by_file:
                buckets[split].append((row, label))
            else:
                buckets[split_of(classify_example(row, seq_len, label))].append((row, label))
    if by_file:  # keep splits disjoint: later splits win
        seen: set[bytes] = set()
        for split in ('test', 'eval', 'train'):
            kept = []
            for row, label in buckets[split]:
                key = row.tobytes() + bytes([label])
                if key not in seen:
                    kept.append((row, label))
            seen.update(r.tobytes() + bytes([lab]) for r, lab in kept)
            buckets[split] = kept
    out: Rows = {}
    for split in SPLITS:
        rows = buckets[split]
        how = ("name a file for it (e.g. *_val.tsv)" if by_file else
               "add rows, or name per-split files (*_train.tsv, *_val.tsv, *_test.tsv)")
        require(bool(rows), 'files', f"no rows fall in split '{split}'; {how}")
        out[split] = ([r for r, _ in rows], np.array([lab for _, lab in rows], np.int64))
    return out
