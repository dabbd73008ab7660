"""Sweep definitions: small helpers that compose into a list of trials.

A trial is a dict of dotted config field -> value (the overrides of that trial). In
`product` and `zip`, a mapping `{field: [v1, v2]}` stands for one axis per field; a
list is a list of alternatives, anything else (a tuple included: `(16, 32)` is one
value of `eval.dependency_lengths`) a single value.

    product({'model.name': ['transformer', 'lstm'], 'model.size': ['tiny', 'mini']}, seeds(3))
    concat(product(...), zip({'model.name': ['gru', 'rnn'], 'optim.learning_rate': [3e-3, 1e-2]}))
    random(8, seed=0, **{'optim.learning_rate': log_uniform(1e-4, 1e-2), 'model.dropout': uniform(0, 0.3)})
    isoflop([1e12, 3e12], ['tiny', 'mini', 'small'])
"""

from __future__ import annotations

import builtins
import dataclasses
import itertools
import math
from typing import Any, Iterable, Mapping, Sequence, Union

import numpy as np

Trial = dict[str, Any]
Part = Union[Mapping[str, Any], Sequence[Trial]]


def _trials(part: Part) -> list[Trial]:
    """A mapping of axes -> the product of its axes; a list of trials -> itself."""
    if isinstance(part, Mapping):
        axes = [[{field: v} for v in (values if isinstance(values, list) else [values])]
                for field, values in part.items()]
        return [_merge(combo) for combo in itertools.product(*axes)]
    trials = list(part)
    for trial in trials:
        if not isinstance(trial, Mapping):
            raise TypeError(f'a sweep part must be a mapping of field -> values or a list of trials (dicts), '
                            f'not a list holding {trial!r}')
    return [dict(t) for t in trials]


def _merge(trials: Iterable[Mapping[str, Any]]) -> Trial:
    out: Trial = {}
    for trial in trials:
        for field, value in trial.items():
            if field in out and out[field] != value:
                raise ValueError(f'sweep field {field} is set twice in one trial ({out[field]!r} and {value!r})')
            out[field] = value
    return out


def product(*parts: Part) -> list[Trial]:
    """Every combination of the parts' trials (the first part varies slowest)."""
    return [_merge(combo) for combo in itertools.product(*(_trials(p) for p in parts))]


def zip(*parts: Part) -> list[Trial]:  # noqa: A001 -- the sweep vocabulary, as in other sweep tools
    """The i-th trials of every part merged; the parts must have equal lengths. Here a
    mapping's fields are zipped too: zip({'a': [1, 2], 'b': [3, 4]}) is a=1,b=3 and a=2,b=4."""
    lists = [aligned for p in parts for aligned in _zip_part(p)]
    lengths = {len(t) for t in lists}
    if len(lengths) > 1:
        raise ValueError(f'sweep.zip needs parts of one length, got lengths {sorted(len(t) for t in lists)}')
    return [_merge(combo) for combo in builtins.zip(*lists)]


def _zip_part(part: Part) -> list[list[Trial]]:
    """A part of `zip` as a list of aligned lists: one per field of a mapping."""
    if isinstance(part, Mapping):
        return [_trials({field: values}) for field, values in part.items()]
    return [_trials(part)]


def concat(*parts: Part) -> list[Trial]:
    """The parts' trials one after the other."""
    return [t for p in parts for t in _trials(p)]


def seeds(k: int, field: str = 'train.seed', start: int = 0) -> list[Trial]:
    """k training seeds (parameter init, dropout, data order; the data itself is task.seed)."""
    return [{field: start + i} for i in range(k)]


def experiment_seeds(options: Mapping[str, Any], default: int) -> list[Trial]:
    """The seeds an experiment file's options (`config.experiment_options`) ask for:
    `seeds=K` of them (else the form's `default`), numbered from `first_seed=N`."""
    return seeds(options['seeds'] or default, start=options['first_seed'])


@dataclasses.dataclass(frozen=True)
class Distribution:
    """A distribution `random` draws one value per trial from."""
    kind: str
    args: tuple

    def sample(self, rng: np.random.Generator) -> Any:
        if self.kind == 'choice':
            return self.args[int(rng.integers(len(self.args)))]
        lo, hi = self.args
        if self.kind == 'uniform':
            return float(rng.uniform(lo, hi))
        if self.kind == 'log_uniform':
            return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        if self.kind == 'int_log_uniform':  # integers in [lo, hi]: floor of log-uniform on [lo, hi + 1)
            return int(min(hi, math.floor(math.exp(rng.uniform(math.log(lo), math.log(hi + 1))))))
        raise ValueError(self.kind)


def choice(*values: Any) -> Distribution:
    if not values:
        raise ValueError('sweep.choice needs at least one value')
    return Distribution('choice', values)


def _range(kind: str, lo: float, hi: float, positive: bool) -> Distribution:
    if not lo <= hi or (positive and lo <= 0):
        raise ValueError(f'sweep.{kind}({lo}, {hi}): need {"0 < " if positive else ""}low <= high')
    return Distribution(kind, (lo, hi))


def uniform(lo: float, hi: float) -> Distribution:
    return _range('uniform', lo, hi, False)


def log_uniform(lo: float, hi: float) -> Distribution:
    return _range('log_uniform', lo, hi, True)


def int_log_uniform(lo: int, hi: int) -> Distribution:
    return _range('int_log_uniform', int(lo), int(hi), True)


def random(n: int, seed: int, **distributions: Distribution | Any) -> list[Trial]:
    """n trials, each field drawn from its distribution (a plain value is fixed), from
    one seeded generator: the same (n, seed, distributions) give the same trials."""
    rng = np.random.default_rng(seed)
    trials = []
    for _ in range(n):
        trials.append({field: d.sample(rng) if isinstance(d, Distribution) else d
                       for field, d in sorted(distributions.items())})
    return trials


def isoflop(budgets: Sequence[float], sizes: Sequence[str], *, field: str = 'model.size') -> list[Trial]:
    """IsoFLOP profiles (Hoffmann et al. 2022): for each compute budget, one trial per
    model size, each trained for the steps that spend the budget (`train.flops_budget`;
    `train.steps` and `train.tokens` are unset). Combine with `product` for several families."""
    return [{'train.steps': None, 'train.tokens': None, 'train.flops_budget': float(c), field: s}
            for c in budgets for s in sizes]
