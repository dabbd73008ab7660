"""What the training loop keeps and writes besides the train state: how a run presents
itself (RunInfo), the time spent in training steps (StepTimer), what a run has measured
so far (Measured, carried over restarts in the checkpoints' metadata), and the files one
start of a run writes to (Outputs: config.json, checkpoints, events, progress lines).

Kept apart from loop.py so that the loop reads top to bottom as the order of work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import time
from typing import Any, Iterator

import jax
import numpy as np

from flaxformer_lite import config as config_lib
from flaxformer_lite import sharding, tracking
from flaxformer_lite.resolve import Run
from flaxformer_lite.train import checkpoint, evaluate
from flaxformer_lite.train.setup import Setup
from flaxformer_lite.train.state import TrainState


@dataclasses.dataclass
class RunInfo:
    """How a run presents itself: its name (in results.json and as the HParams trial ID),
    the fields the HParams tab shows first, the metrics it declares there (None: the ones
    this run logs), and extra hyperparameter columns (a sweep adds its name)."""
    name: str
    first: tuple[str, ...] = tracking.KEY_FIELDS
    metrics: tuple[str, ...] | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    trial_id: str | None = None  # the HParams row's ID (default: name, or tracking.trial_id in a sweep)


def default_info(workdir: str) -> RunInfo:
    return RunInfo(name=os.path.basename(os.path.normpath(os.path.abspath(workdir))))


class StepTimer:
    """Seconds spent in training steps only. The loop pauses it around compilation (the
    first step of each start), evaluation, checkpointing and logging; pausing waits for
    the steps already dispatched, so their time is counted where it was spent."""

    def __init__(self):
        self.steps, self.seconds = 0, 0.0
        self._window_steps, self._window_seconds = 0, 0.0
        self._since: float | None = None

    def start(self) -> None:
        self._since = time.perf_counter()

    def stop(self, *pending: Any) -> None:
        if self._since is None:
            return
        jax.block_until_ready(pending)
        elapsed = time.perf_counter() - self._since
        self._since = None
        self.seconds += elapsed
        self._window_seconds += elapsed

    @contextlib.contextmanager
    def paused(self, *pending: Any) -> Iterator[None]:
        """Stopped for the block (once `pending` is computed), then running again if it was."""
        running = self._since is not None
        self.stop(*pending)
        yield
        if running:
            self.start()

    def count(self) -> None:
        """One training step dispatched (counted only while the timer runs)."""
        if self._since is not None:
            self.steps += 1
            self._window_steps += 1

    def window_rate(self) -> float | None:
        """Steps per second since the previous call (None if no timed step)."""
        rate = self._window_steps / self._window_seconds if self._window_steps and self._window_seconds > 0 else None
        self._window_steps, self._window_seconds = 0, 0.0
        return rate


@dataclasses.dataclass
class Measured:
    """What a run has measured so far, carried over restarts in the checkpoints' metadata
    (results.json sums it), and what this start adds to it."""
    best: dict[str, dict[str, float]]  # eval/* metric -> {'value', 'step'} of its best evaluation
    history: dict[str, list]  # eval/* metric -> [[step, value], ...] of every evaluation (learning curves)
    skipped: int  # non-finite updates skipped so far
    train_logged: dict | None  # the last train/* summary and its step
    init_from: dict | None  # where the first weights came from (train.init_from)
    wall_before: float  # seconds of the earlier starts: wall clock, in training steps, and those steps
    train_before: float
    timed_before: int
    last_eval: dict[str, float] = dataclasses.field(default_factory=dict)  # this start's last eval/* metrics
    first_step_s: float | None = None  # this start up to its first step's end: what the compilation cache saves

    @classmethod
    def of(cls, meta: dict[str, Any]) -> Measured:
        """From a checkpoint's metadata ({} for a first start)."""
        return cls(best=dict(meta.get('best', {})), history={k: list(v) for k, v in meta.get('history', {}).items()},
                   skipped=int(meta.get('skipped_updates', 0)), train_logged=meta.get('train_logged'),
                   init_from=meta.get('init_from'), wall_before=float(meta.get('wall_s', 0.0)),
                   train_before=float(meta.get('train_s', 0.0)), timed_before=int(meta.get('timed_steps', 0)))

    def evaluated(self, step: int, metrics: dict[str, float]) -> None:
        """An evaluation of the eval split: the last one, the history and the best values."""
        self.last_eval = metrics
        for name, value in metrics.items():
            self.history.setdefault(name, []).append([step, value])
        for name, value in metrics.items():
            if name not in self.best or evaluate.is_better(name, value, self.best[name]['value']):
                self.best[name] = {'value': value, 'step': step}

    def meta(self, timer: StepTimer, session_start: float) -> dict[str, Any]:
        """The checkpoint's metadata; `session_start`: when this start of the run began."""
        return {'best': self.best, 'wall_s': self.wall_before + time.time() - session_start,
                'train_s': self.train_before + timer.seconds, 'timed_steps': self.timed_before + timer.steps,
                'skipped_updates': self.skipped, 'train_logged': self.train_logged, 'init_from': self.init_from,
                'history': self.history}


def train_summary(pending: list[dict], kind: str) -> dict[str, float]:
    """Mean over the steps since the last log (`pending`: their metrics, fetched)."""
    mean = lambda k: float(np.mean([m[k] for m in pending]))  # noqa: E731
    out = {'train/loss': mean('objective'), 'train/grad_norm': mean('grad_norm'),
           'train/learning_rate': float(pending[-1]['learning_rate'])}
    if kind == 'regress':
        out['train/mse'] = sum(float(m['loss']) for m in pending) / max(sum(float(m['weight']) for m in pending), 1e-9)
    else:
        out['train/accuracy'] = (sum(float(m['correct']) for m in pending)
                                 / max(sum(float(m['weight']) for m in pending), 1e-9))
    return out


class Outputs:
    """What one start of a run writes to: config.json (written on entering), checkpoints,
    TensorBoard events (process 0) and progress lines. Closed whatever ends the run, the
    pending checkpoints finished first; after a failure, a failing close does not hide it."""

    def __init__(self, workdir: str, cfg: Any, *, verbose: bool):
        self.workdir, self.cfg, self.verbose = workdir, cfg, verbose

    def __enter__(self) -> Outputs:
        chief = jax.process_index() == 0
        workdir, cfg = self.workdir, self.cfg
        self.earlier_events = os.path.isdir(workdir) and any(n.startswith('events.out.tfevents')
                                                             for n in os.listdir(workdir))
        if chief:
            checkpoint.write_config(workdir, cfg.to_dict())
        self.ckpt = checkpoint.Checkpointer(workdir, max_to_keep=cfg.checkpoint.max_to_keep,
                                            async_save=cfg.checkpoint.async_save)
        self.progress = tracking.Progress(cfg.train.steps, 0, enabled=self.verbose and chief)
        self.writer = tracking.Writer(workdir) if chief else tracking.NullWriter()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for close in (self.ckpt.wait, self.ckpt.close, self.writer.close, self.progress.close):
            try:
                close()
            except Exception:  # noqa: BLE001 -- after a failure, cleanup must not hide it
                if exc_type is None:
                    raise

    def log_evaluation(self, step: int, scalars: dict[str, Any], curves: dict[str, np.ndarray], *, task: str) -> None:
        """An evaluation's scalars, its loss-by-position plots and its line, flushed."""
        self.writer.scalars(step, scalars)
        for prefix, curve in curves.items():
            png, w, h = tracking.line_plot_png(curve, title=f'{task}: {prefix} loss by position',
                                               xlabel='position in context', ylabel='loss (nats)')
            self.writer.image(step, f'{prefix}/loss_by_position', png, w, h)
        self.progress.message(f'step {step}: ' + ' '.join(f'{k} {v:.4g}' for k, v in scalars.items()
                                                          if '/loss_at_position/' not in k))
        self.writer.flush()


def log_start(exp: Run, setup: Setup, state: TrainState, *, out: Outputs, start: int, info: RunInfo,
              counts: dict[str, float]) -> None:
    """The layout lines, and the TensorBoard record of a start: its START marker and, for a
    first start, the config as text and the HParams declaration."""
    cfg_dict = exp.config.to_dict()
    out.progress.message(sharding.describe_layout(setup.mesh, setup.rules_name, state.params, state.opt_state))
    for note in setup.notes:
        out.progress.message('  ' + note)
    # A SessionLog START at the step this start takes over from makes TensorBoard's reader
    # drop what earlier starts wrote there and later (work this start redoes). The first
    # START of a run only marks its beginning, so after earlier starts (possibly written
    # before these markers existed) write it twice.
    marker = 0 if start == 0 else start if start >= exp.config.train.steps else start + 1
    for _ in range(2 if out.earlier_events else 1):
        out.writer.restart_at(marker)
    if start == 0:
        out.writer.text(0, 'config', '```\n' + config_lib.to_json(cfg_dict) + '\n```')
        metrics = info.metrics if info.metrics is not None else evaluate.metric_names(exp)
        # Every run declares `sweep` (single runs too), so no run lacks a column.
        hparams = {'sweep': tracking.NO_SWEEP, **info.extra, **config_lib.flatten(cfg_dict),
                   **{f'accounting.{k}': v for k, v in counts.items()}}
        sweep = info.extra.get('sweep')
        trial_id = info.trial_id or (tracking.trial_id(sweep, hparams, info.first) if sweep else info.name)
        out.writer.hparams(hparams, [*metrics, 'train/loss'], first=info.first, trial_id=trial_id)


def next_steps(exp: Run, workdir: str) -> str:
    """The closing lines of a finished run: where to look at it and what to run next."""
    parent = os.path.dirname(os.path.normpath(workdir)) or '.'
    where = shlex.quote(workdir)
    lines = [f'next: tensorboard --logdir {shlex.quote(parent)}',
             f'      python launch.py --eval_only --workdir={where}']
    if exp.spec.kind in ('lm', 'seq2seq') and exp.family.decoder is not None:
        lines.append(f"      python launch.py --generate --workdir={where} --prompt=TEXT")
    return '\n'.join(lines)
