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
from flaxformer_lite.tasks import Task, TaskSpec


@dataclasses.dataclass
class Experiment:
    config: ml_collections.ConfigDict  # resolved (model fields filled) and locked
    task: Task
    eval_tasks: dict[str, Task]  # tag prefix ('eval', 'eval/dep_64', ...) -> task
    family: ModelFamily
    model_cfg: dict[str, Any]

    @property
    def spec(self) -> TaskSpec:
        return self.task.spec

    def tokens_per_example(self) -> int:
        """Positions a model processes per example (inputs, plus targets for seq2seq)."""
        spec = self.spec
        return spec.input_len + (spec.target_len if spec.kind == 'seq2seq' else 0)


def resolve(cfg: ml_collections.ConfigDict) -> Experiment:
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
    if model['max_len'] is None:
        model['max_len'] = max(max(t.spec.input_len, t.spec.target_len) for t in eval_tasks.values())
    resolved = family.resolve(model, config_lib.SIZES[cfg.model.size], task.spec)
    unknown = set(resolved) - set(model)
    assert not unknown, f'{family.name}.resolve invented config fields {unknown}'
    cfg = ml_collections.ConfigDict(cfg.to_dict(), type_safe=False)  # a resolved copy; the input stays as given
    for key, value in resolved.items():
        cfg.model[key] = value
    if cfg.eval.batch_size is None:
        cfg.eval.batch_size = cfg.train.batch_size
    cfg.lock()
    return Experiment(config=cfg, task=task, eval_tasks=eval_tasks, family=family, model_cfg=resolved)
