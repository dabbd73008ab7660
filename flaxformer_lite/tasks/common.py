"""Small helpers shared by the task modules: knob checks, LM packing, text files.

Kept apart from `base.py` so that the task interface stays small; nothing here is
needed to *use* a task, only to write one.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from flaxformer_lite.errors import ConfigError
from flaxformer_lite.tasks.base import require

PAD, BOS = 0, 1


def check_ints(cfg: Mapping[str, Any], minimums: Mapping[str, int]) -> None:
    """Every named knob is an integer of at least its minimum."""
    for field, lo in minimums.items():
        value = cfg.get(field)
        require(isinstance(value, (int, np.integer)) and not isinstance(value, bool), field,
                f'expected an integer, got {value!r}')
        require(value >= lo, field, f'is {value} but must be at least {lo}')


def check_choice(cfg: Mapping[str, Any], field: str, allowed: Sequence[str]) -> None:
    require(cfg.get(field) in allowed, field,
            f"is {cfg.get(field)!r}; choose one of {', '.join(map(str, allowed))}")


def check_seq_len(cfg: Mapping[str, Any], need: int, what: str) -> None:
    """`seq_len` must hold `need` tokens; the message names the shorter dependency fix."""
    require(cfg['seq_len'] >= need, 'seq_len',
            f"seq_len={cfg['seq_len']} cannot hold {what}; use task.seq_len>={need}"
            + (' or a shorter task.dependency_length' if 'dependency_length' in cfg else ''))


def lm_example(tokens: np.ndarray, answer_positions: np.ndarray | slice | Iterable[int]
               ) -> dict[str, np.ndarray]:
    """Pack a stream of `seq_len + 1` tokens as next-token prediction.

    `answer_positions` index `inputs`: position i is weighted when predicting
    tokens[i + 1] is what the task asks.
    """
    weights = np.zeros(len(tokens) - 1, np.float32)
    weights[answer_positions] = 1.0
    return dict(inputs=tokens[:-1].astype(np.int32), targets=tokens[1:].astype(np.int32),
                weights=weights)


def pad_to(tokens: Sequence[int] | np.ndarray, length: int) -> np.ndarray:
    """`tokens` followed by PAD up to `length`, int32."""
    out = np.full(length, PAD, np.int32)
    out[:len(tokens)] = tokens
    return out


def classify_example(tokens: Sequence[int] | np.ndarray, length: int, label: int) -> dict[str, np.ndarray]:
    """`tokens` padded with PAD to `length`; one integer class."""
    return dict(inputs=pad_to(tokens, length), targets=np.asarray(label, np.int32),
                weights=np.asarray(1.0, np.float32))


def gumbel_topk(rng: np.random.Generator, log_p: np.ndarray, k: int) -> np.ndarray:
    """k distinct indices drawn without replacement with probabilities exp(log_p)
    (Gumbel top-k; the same law as successive weighted draws, ~10x faster than
    `rng.choice(..., replace=False, p=...)`)."""
    keys = log_p - np.log(-np.log(rng.random(len(log_p))))
    return np.argpartition(-keys, k - 1)[:k]


# --- text files -----------------------------------------------------------------

_GLOB_CHARS = set('*?[')


def as_patterns(files: Any, field: str = 'files') -> tuple[str, ...]:
    """`task.files` as a tuple of glob patterns: None / '' -> (), 'a,b' stays one glob."""
    if files is None or files == '' or files == ():
        return ()
    if isinstance(files, str):
        return (files,)
    require(isinstance(files, (tuple, list)) and all(isinstance(f, str) and f for f in files),
            field, f"expected a glob string or a tuple of globs, got {files!r}")
    return tuple(files)


def resolve_files(patterns: Sequence[str], field: str = 'files') -> list[str]:
    """Sorted, de-duplicated regular files named by the patterns; every pattern must
    name at least one file (a typo should not silently shrink the corpus)."""
    out: list[str] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if not _GLOB_CHARS & set(expanded):
            require(os.path.exists(expanded), field,
                    f"file '{pattern}' does not exist; fix the path or remove it from task.{field}")
            require(os.path.isfile(expanded), field,
                    f"'{pattern}' is not a regular file; name files or a glob such as '{pattern}/*.txt'")
            out.append(expanded)
            continue
        matches = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
        require(bool(matches), field,
                f"no file matches '{pattern}'; fix the glob or remove it from task.{field}")
        out.extend(matches)
    return sorted(set(os.path.abspath(p) for p in out))


def read_text(path: str, field: str = 'files') -> bytes:
    """The bytes of a non-empty text file, or a ConfigError naming `task.<field>`."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"task.{field}: cannot read '{path}' ({e.strerror}); fix its "
                          f"permissions or remove it from task.{field}") from None
    require(len(data.strip()) > 0, field, f"'{path}' is empty; remove it from task.{field}")
    require(b'\0' not in data, field,
            f"'{path}' looks binary (it holds NUL bytes); name text files only in task.{field}")
    return data
