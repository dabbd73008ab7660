"""Shared helpers: tiny configs that train in seconds, and reading runs back."""

from __future__ import annotations

import os

import pytest

from flaxformer_lite import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where launch.py and configs/ are

# A recall task small enough to learn in ~100 steps (chance accuracy 1/4).
TINY_RECALL = {
    'task.seq_len': 16, 'task.dependency_length': 3, 'task.num_pairs': 2, 'task.num_queries': 2,
    'task.num_keys': 4, 'task.num_values': 4, 'task.num_noise': 2,
}
TINY_MODEL = {'model.num_layers': 2, 'model.d_model': 32, 'model.num_heads': 2, 'model.d_ff': 64}
TINY_TRAIN = {'train.batch_size': 16, 'train.steps': 20, 'train.log_every': 5, 'eval.every_steps': 10,
              'eval.num_examples': 32, 'checkpoint.every_steps': 10, 'optim.warmup_steps': 5,
              'optim.learning_rate': 3e-3, 'checkpoint.async_save': False}


def tiny_config(task: str = 'recall', model: str = 'transformer', **overrides):
    """A locked config: tiny model and run; `overrides` use dotted keys with '__' for '.'."""
    cfg = config_lib.base_config(task)
    cfg.model.name = model
    fields = {**(TINY_RECALL if task == 'recall' else {}), **TINY_MODEL, **TINY_TRAIN}
    fields.update({k.replace('__', '.'): v for k, v in overrides.items()})
    for key, value in fields.items():
        config_lib.set_field(cfg, key, value)
    cfg.lock()
    return cfg


def read_scalars(workdir: str) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from every event file in `workdir` (TensorBoard's own reader)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util
    acc = EventAccumulator(workdir, size_guidance={'tensors': 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()['tensors']:
        try:
            out[tag] = {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}
        except (TypeError, ValueError):
            continue  # text / image summaries
    return out


@pytest.fixture
def workdir(tmp_path):
    return str(tmp_path / 'run')
