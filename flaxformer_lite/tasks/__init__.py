"""Task registry: `config.task.name` -> Task class. A new task is one module + one line here.

`default_config(name)` gives the task's knobs (they become `config.task.*`);
`build(cfg)` checks them and returns the Task, raising ConfigError for impossible ones.
"""

from __future__ import annotations

import difflib
from typing import Any, Mapping

import ml_collections
from ml_collections.config_dict import placeholder

from flaxformer_lite.errors import ConfigError
from flaxformer_lite.spec import TaskSpec
from flaxformer_lite.tasks.base import SPLITS, Task, split_of
from flaxformer_lite.tasks.adding import Adding
from flaxformer_lite.tasks.agreement import Agreement
from flaxformer_lite.tasks.copy import Copy
from flaxformer_lite.tasks.dyck import Dyck
from flaxformer_lite.tasks.induction import Induction
from flaxformer_lite.tasks.listops import ListOps
from flaxformer_lite.tasks.mqar import MQAR
from flaxformer_lite.tasks.parity import Parity
from flaxformer_lite.tasks.recall import Recall
from flaxformer_lite.tasks.selective_copy import SelectiveCopy
from flaxformer_lite.tasks.seq2seq import Seq2Seq
from flaxformer_lite.tasks.text_lm import TextLM

REGISTRY: dict[str, type[Task]] = {
    cls.name: cls for cls in (
        Recall,
        Copy,
        SelectiveCopy,
        MQAR,
        Adding,
        ListOps,
        Agreement,
        Parity,
        Dyck,
        Induction,
        TextLM,
        Seq2Seq,
    )
}

__all__ = ['REGISTRY', 'SPLITS', 'Task', 'TaskSpec', 'build', 'default_config', 'split_of']


def _lookup(name: str) -> type[Task]:
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, list(REGISTRY), n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"choose one of {', '.join(sorted(REGISTRY))}"
        raise ConfigError(f"task.name='{name}' is not a known task; {hint}")
    return REGISTRY[name]


def default_config(name: str) -> ml_collections.ConfigDict:
    """`name`, `seed` (which examples: fixed across training seeds), then the task's knobs."""
    cls = _lookup(name)
    # An unset knob (None, e.g. `files`) is a typed placeholder, so that the command line
    # can set it: a glob becomes a 1-tuple, '(a,b)' a tuple.
    knobs = {k: placeholder(tuple) if v is None else v for k, v in cls.DEFAULTS.items()}
    return ml_collections.ConfigDict(dict(name=name, seed=0, **knobs))


def build(cfg: Mapping[str, Any]) -> Task:
    cfg = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
    return _lookup(cfg['name'])(cfg)
