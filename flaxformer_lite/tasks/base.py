"""What every task is: a random-access source of examples plus what a model needs to know.

A task never touches models or training. Example `i` of a split is a pure function of
`(task.seed, split, i)`, so any batch can be regenerated after a restart, and the
splits are disjoint by construction: an example belongs to the split its content hash
names (`split_of`), and generation redraws until the hash agrees. No example can
therefore appear in two splits, whatever the seed or size of the example space.
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar, Mapping

import numpy as np

from flaxformer_lite.errors import ConfigError, UserError
from flaxformer_lite.spec import TaskSpec

SPLITS = ('train', 'eval', 'test')
# Share of the example space per split (by content hash, in 1/1000).
_SPLIT_BOUNDS = {'test': (0, 100), 'eval': (100, 200), 'train': (200, 1000)}


def split_of(example: Mapping[str, np.ndarray]) -> str:
    """The split an example belongs to, from a hash of its inputs and targets."""
    h = hashlib.blake2b(digest_size=8)
    for key in ('inputs', 'targets'):
        h.update(np.ascontiguousarray(example[key]).tobytes())
    bucket = int.from_bytes(h.digest(), 'little') % 1000
    return next(s for s, (lo, hi) in _SPLIT_BOUNDS.items() if lo <= bucket < hi)


class Task:
    """Base class. Subclasses set `name`, `DEFAULTS` and implement `_generate`, `spec`,
    `decode` and `chance`.

    Examples are dicts of NumPy arrays: `inputs` int32 [input_len]; `targets` int32
    [target_len] (lm, seq2seq), int32 [] (classify) or float32 [] (regress); `weights`
    float32 with the shape of `targets` (which targets count in loss and metrics).
    """
    name: ClassVar[str] = ''
    # Task-specific knobs with their defaults; they become `config.task.*`.
    DEFAULTS: ClassVar[dict[str, Any]] = {}
    # Attempts before giving up on drawing an example of the wanted split.
    MAX_ATTEMPTS: ClassVar[int] = 10_000

    def __init__(self, cfg: Mapping[str, Any]):
        self.cfg = dict(cfg)
        self.seed = int(self.cfg.get('seed', 0))

    # --- to implement -------------------------------------------------------
    @property
    def spec(self) -> TaskSpec:
        raise NotImplementedError

    def _generate(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One example drawn with `rng` (any split; `example` sorts them)."""
        raise NotImplementedError

    def decode(self, example: Mapping[str, np.ndarray]) -> tuple[str, str]:
        """Human-readable (input, target) of one example."""
        raise NotImplementedError

    def chance(self) -> dict[str, float]:
        """Metric values of the best predictor that ignores the dependency (e.g.
        uniform over answers, or the mean for regression)."""
        raise NotImplementedError

    # --- shared ---------------------------------------------------------------
    def num_examples(self, split: str) -> int:
        """Size of the random-access source (generated tasks are effectively unbounded)."""
        del split
        return 2**31 - 1

    def example(self, split: str, index: int) -> dict[str, np.ndarray]:
        """Example `index` of `split`: deterministic, and never in another split."""
        # One stream per (seed, split, index); redraws continue it until the hash agrees.
        rng = np.random.default_rng([self.seed, SPLITS.index(split), int(index)])
        for _ in range(self.MAX_ATTEMPTS):
            ex = self._generate(rng)
            if split_of(ex) == split:
                return ex
        raise ConfigError(
            f"task {self.name}: could not draw an example of split '{split}' in "
            f"{self.MAX_ATTEMPTS} tries; the example space is too small, raise task.seq_len "
            f"or the vocabulary")

    # --- prompts and generated text (`launch.py --generate`) --------------------
    def prompt_tokens(self, text: str) -> np.ndarray:
        """A prompt written as `decode` prints examples (token names separated by spaces)
        -> token ids; a word that names no token is a UserError listing the tokens."""
        names: dict[str, int] = {}
        for token in range(self.spec.vocab_size):
            names.setdefault(self.token_name(token), token)
        words = text.split()
        unknown = [w for w in words if w not in names]
        if unknown:
            shown = ' '.join(list(names)[:40]) + (' ...' if len(names) > 40 else '')
            raise UserError(f"--prompt: {unknown[0]!r} is not a token of task {self.name}; write tokens as "
                            f"--show_examples prints them, separated by spaces: {shown}")
        return np.array([names[w] for w in words], np.int32)

    def token_name(self, token: int) -> str:
        name = getattr(self, '_name', None)
        if name is None:
            raise UserError(f'task {self.name} has no token names to read a prompt in; --generate needs a language-'
                            f'model or sequence-to-sequence task')
        return name(int(token))

    def tokens_text(self, tokens: np.ndarray) -> str:
        """Generated tokens as text (the notation of `decode`)."""
        return ' '.join(self.token_name(t) for t in tokens)

    def with_dependency_length(self, length: int) -> 'Task':
        """The same task evaluated at another dependency length (length generalisation)."""
        if 'dependency_length' not in self.cfg:
            raise ConfigError(f'eval.dependency_lengths: task {self.name} has no dependency_length knob')
        cfg = dict(self.cfg, dependency_length=int(length))
        need = self.min_seq_len(cfg)
        if need is not None and cfg.get('seq_len', need) < need:
            cfg['seq_len'] = need
        return type(self)(cfg)

    @classmethod
    def min_seq_len(cls, cfg: Mapping[str, Any]) -> int | None:
        """Shortest `seq_len` that holds the configured dependency (None: not applicable)."""
        del cfg
        return None


def require(condition: bool, field: str, message: str) -> None:
    """Raise a ConfigError naming `task.<field>` unless `condition`."""
    if not condition:
        raise ConfigError(f'task.{field}: {message}')


class LMTask(Task):
    """A task posed as next-token prediction over `seq_len` positions of one vocabulary:
    subclasses set `self.vocab_size`, weight the positions that the task asks, and name
    tokens for display (`_name`)."""
    # decode shows each answer as 'cue->answer' (the input token at the answered position
    # and its target); False: the answers alone.
    SHOW_CUE: ClassVar[bool] = True

    def _name(self, token: int) -> str:
        raise NotImplementedError

    def decode(self, example: Mapping[str, np.ndarray]) -> tuple[str, str]:
        inputs = ' '.join(self._name(t) for t in example['inputs'])
        where = np.nonzero(example['weights'])[0]
        if self.SHOW_CUE:
            answers = (f"{self._name(example['inputs'][i])}->{self._name(example['targets'][i])}" for i in where)
        else:
            answers = (self._name(example['targets'][i]) for i in where)
        return inputs, ' '.join(answers)

    @property
    def spec(self) -> TaskSpec:
        n = self.cfg['seq_len']
        return TaskSpec(kind='lm', vocab_size=self.vocab_size, input_len=n, target_len=n,
                        num_outputs=self.vocab_size, pad_id=0, bos_id=1)
