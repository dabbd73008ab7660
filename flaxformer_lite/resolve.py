"""From a config to everything a run needs: the task, the evaluation tasks, the model
family and its resolved hyperparameters. Resolution fills the size table's values into
the config and raises ConfigError for anything that cannot work, before any file is
written, so `--describe`, `--show_examples` and training all see the same experiment.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from flaxformer_lite import config as config_lib
from flaxformer_lite import models, tasks
from flaxformer_lite.errors import ConfigError
from flaxformer_lite.models.family import ModelFamily
from flaxformer_lite.spec import TaskSpec
from flaxformer_lite.tasks import Task


@dataclasses.dataclass
class Run:
    """One run, resolved: what `from_config` returns and everything downstream reads."""
    config: ml_collections.ConfigDict  # resolved (model fields filled) and locked
    task: Task
    eval_tasks: dict[str, Task]  # tag prefix ('eval', 'eval/dep_64', ...) -> task
    family: ModelFamily
    model_cfg: dict[str, Any]  # the resolved model fields (+ `mup_base_width` under optim.parametrization=mup)
    derived: tuple[str, ...] = ()  # fields left unset in the config as given (resolution fills them)

    @property
    def spec(self) -> TaskSpec:
        return self.task.spec

    def tokens_per_example(self) -> int:
        """Positions a model processes per example (inputs, plus targets for seq2seq)."""
        spec = self.spec
        return spec.input_len + (spec.target_len if spec.kind == 'seq2seq' else 0)


def from_config(cfg: ml_collections.ConfigDict) -> Run:
    config_lib.check(cfg)
    task = tasks.build(cfg.task)
    eval_tasks = {'eval': task}
    for length in cfg.eval.dependency_lengths or ():
        if not isinstance(length, int) or length < 1:
            raise ConfigError(f'eval.dependency_lengths: {length!r} is not a positive integer')
        eval_tasks[f'eval/dep_{length}'] = task.with_dependency_length(length)
    for name, other in eval_tasks.items():
        s, o = task.spec, other.spec
        if (s.kind, s.vocab_size, s.num_outputs) != (o.kind, o.vocab_size, o.num_outputs):
            raise ConfigError(f'eval.dependency_lengths: {name} changes the vocabulary of task {task.name}')
    family = models.get(cfg.model.name)
    model = cfg.model.to_dict()
    # The model is defined by the training task alone: evaluation settings (which may be
    # added when a run is resumed) never change a parameter shape.
    resolved = family.resolve(model, config_lib.SIZES[cfg.model.size], task.spec)
    unknown = set(resolved) - set(model)
    assert not unknown, f'{family.name}.resolve invented config fields {unknown}'
    if resolved.get('pos_encoding') == 'learned' and resolved.get('max_len') is not None:  # a position table
        for name, other in eval_tasks.items():
            longest = max(other.spec.input_len, other.spec.target_len)
            if longest > resolved['max_len']:
                raise ConfigError(
                    f"model.pos_encoding='learned' has no positions beyond model.max_len={resolved['max_len']}, but "
                    f"{name} has sequences of {longest}; use model.pos_encoding=sinusoidal (or rotary), or raise "
                    f"model.max_len to {longest} for a new run")
    # Unset ('auto' or None) in the config as given: the family's or the size row's values.
    derived = tuple(f'model.{k}' for k, v in model.items() if v is None or v == 'auto')
    cfg = ml_collections.ConfigDict(cfg.to_dict(), type_safe=False)  # a resolved copy; the input stays as given
    for key, value in resolved.items():
        cfg.model[key] = value
    if cfg.eval.batch_size is None:
        cfg.eval.batch_size = cfg.train.batch_size
        derived += ('eval.batch_size',)
    if cfg.train.steps is None:  # a budget (config.check: exactly one of tokens, flops_budget)
        cfg.train.steps = steps_for_budget(cfg, family, resolved, task.spec)
        derived += ('train.steps',)
    cfg.lock()
    return Run(config=cfg, task=task, eval_tasks=eval_tasks, family=family,
                      model_cfg={**resolved, **parametrization(cfg, family, resolved)}, derived=derived)


def parametrization(cfg: ml_collections.ConfigDict, family: ModelFamily, model_cfg: dict[str, Any]
                    ) -> dict[str, Any]:
    """The model hyperparameters optim.parametrization adds (`models/mup.py`): under muP,
    `mup_base_width` (every module that builds the model sees it: training, evaluation,
    decoding); nothing under SP. A base width above the model's width is refused."""
    if cfg.optim.parametrization != 'mup':
        return {}
    width, base = model_cfg[family.width_field], cfg.optim.base_width
    if base > width:
        raise ConfigError(f'optim.base_width={base} is larger than the width of this model '
                          f'(model.{family.width_field}={width}); '
                          f'use a base width <= {width} (the narrow model the learning rate was tuned at)')
    return {'mup_base_width': base}


def steps_for_budget(cfg: ml_collections.ConfigDict, family: ModelFamily, model_cfg: dict[str, Any],
                     spec: TaskSpec) -> int:
    """Training steps that spend `train.tokens` or `train.flops_budget` (FLOPs in the
    convention of `accounting.py`) at `train.batch_size`, rounded to the nearest step."""
    tokens_per_example = spec.input_len + (spec.target_len if spec.kind == 'seq2seq' else 0)
    if cfg.train.tokens is not None:
        per_step, budget, name = cfg.train.batch_size * tokens_per_example, cfg.train.tokens, 'train.tokens'
    else:
        per_step = cfg.train.batch_size * family.flops_per_example(model_cfg, spec)
        budget, name = cfg.train.flops_budget, 'train.flops_budget'
    steps = round(budget / per_step)
    if steps < 1:
        raise ConfigError(f'{name}={budget:g} is less than one step ({per_step:g} per step of train.batch_size='
                          f'{cfg.train.batch_size}); raise {name} or lower train.batch_size')
    return steps
