"""Evaluation: the held-out `eval` split during training, the `test` split once at the end.

Every evaluated task (the training task, and one per `eval.dependency_lengths` entry)
has a tag prefix: `eval`, `eval/dep_64`, ... for the eval split and `test`,
`test/dep_64`, ... for the test split. The sets are the first `eval.num_examples`
examples of the split, the same ones in every evaluation and every run of the task, kept
on device; metric sums are added over batches and summarised on the host.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_lite import data, sharding
from flaxformer_lite.resolve import Run
from flaxformer_lite.train import step as step_lib
from flaxformer_lite.train.losses import summarize

# What `summarize` returns for each kind of task (exact_match only when decoding).
METRICS_BY_KIND = {'lm': ('loss', 'accuracy', 'seq_accuracy'), 'seq2seq': ('loss', 'accuracy', 'seq_accuracy'),
                   'mlm': ('loss', 'accuracy', 'seq_accuracy'), 'classify': ('loss', 'accuracy'), 'regress': ('loss', 'mse')}
# Metrics where lower is better (the rest: higher is better), for "best" values.
LOWER_IS_BETTER = ('loss', 'mse')


def split_prefix(prefix: str, split: str) -> str:
    """'eval/dep_64' -> 'test/dep_64' for split 'test'."""
    return split + prefix[len('eval'):]


def decodes(exp: Run) -> bool:
    return exp.spec.kind == 'seq2seq' and exp.config.eval.decode and exp.family.decoder is not None


def reports_seq_accuracy(task: Any) -> bool:
    """Whether sequence accuracy (every target of an example right) is logged for `task`.
    It scores tasks whose targets are a few answers; over free text, where every byte of a
    long chunk is a target (the tasks that report loss by position, such as text_lm), it
    is zero for any model and says nothing. A task may decide with `seq_accuracy = False`."""
    return bool(getattr(task, 'seq_accuracy', not getattr(task, 'report_loss_by_position', False)))


def task_metrics(exp: Run, task: Any) -> tuple[str, ...]:
    """The metric names an evaluation of `task` logs (under its tag prefix)."""
    names = METRICS_BY_KIND[exp.spec.kind] + (('exact_match',) if decodes(exp) else ())
    return tuple(n for n in names if n != 'seq_accuracy' or reports_seq_accuracy(task))


def metric_names(exp: Run, splits: tuple[str, ...] = ('eval', 'test')) -> list[str]:
    """Every scalar an evaluation logs for this experiment (bar loss-by-position curves)."""
    return [f'{split_prefix(prefix, split)}/{name}' for split in splits for prefix, task in exp.eval_tasks.items()
            for name in task_metrics(exp, task)]


def is_better(name: str, value: float, best: float) -> bool:
    return value < best if name.rsplit('/', 1)[-1] in LOWER_IS_BETTER else value > best


class Evaluator:
    """`evaluator(params, split)` -> (scalars, loss-by-position curves) for every task."""

    def __init__(self, exp: Run, setup: Any):
        self.exp = exp
        self.kind = exp.spec.kind
        self.batch_sharding = setup.batch_sharding
        param_sh = setup.state_shardings.params
        out_sh = sharding.replicated(setup.mesh)
        self.eval_step = jax.jit(step_lib.make_eval_step(setup.model, self.kind),
                                 in_shardings=(param_sh, setup.batch_sharding), out_shardings=out_sh)
        # One decoding function per task shape: the cache of a longer evaluation task is longer.
        self.decode_steps: dict[Any, Any] = {}
        if decodes(exp):
            for task in exp.eval_tasks.values():
                if task.spec not in self.decode_steps:
                    fns = exp.family.decoder(exp.model_cfg, task.spec)
                    self.decode_steps[task.spec] = jax.jit(
                        step_lib.make_decode_step(fns, exp.spec.bos_id), in_shardings=(param_sh, setup.batch_sharding),
                        out_shardings=out_sh)
        self._sets: dict[str, list] = {}
        self.sets('eval')  # built up front: a task that cannot make its eval set fails before training

    def sets(self, split: str) -> dict[str, tuple[Any, list]]:
        """{prefix: (task, device batches)} of `split`, made on first use."""
        if split not in self._sets:
            cfg, pi, pc = self.exp.config, jax.process_index(), jax.process_count()
            out = {}
            for prefix, task in self.exp.eval_tasks.items():
                batches = data.eval_batches(task, num_examples=cfg.eval.num_examples, batch_size=cfg.eval.batch_size,
                                            split=split, process_index=pi, process_count=pc)
                out[split_prefix(prefix, split)] = (task, [data.to_global(b, self.batch_sharding) for b in batches])
            self._sets[split] = out
        return self._sets[split]

    def __call__(self, params, split: str = 'eval') -> tuple[dict[str, float], dict[str, np.ndarray]]:
        scalars, curves = {}, {}
        for prefix, (task, batches) in self.sets(split).items():
            decode_step = self.decode_steps.get(task.spec)
            total = None
            for batch in batches:
                sums = self.eval_step(params, batch)
                if decode_step is not None:
                    sums = dict(sums, **decode_step(params, batch))
                total = sums if total is None else jax.tree.map(jnp.add, total, sums)
            total = jax.device_get(total)
            logged = task_metrics(self.exp, task)
            scalars.update({f'{prefix}/{k}': v for k, v in summarize(total, self.kind).items() if k in logged})
            if getattr(task, 'report_loss_by_position', False) and 'loss_by_position' in total:
                curve = total['loss_by_position'] / np.maximum(total['weight_by_position'], 1e-9)
                curves[prefix] = curve
                positions = [p for p in (2 ** np.arange(20)) - 1 if p < len(curve)] + [len(curve) - 1]
                scalars.update({f'{prefix}/loss_at_position/{p + 1:05d}': float(curve[p]) for p in positions})
        return scalars, curves
