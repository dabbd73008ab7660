"""TensorBoard event files written with the tensorboard package alone (no TensorFlow),
and the progress display.

Tags: `train/*` and `eval/*` scalars, the resolved config as text, HParams (the
flattened config with the final eval metrics declared, so the HParams tab compares
runs), and images (for example loss against position in the context).
"""

from __future__ import annotations

import io
import math
import re
import sys
import time
from typing import Any, Mapping, Sequence, TextIO

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.util import tensor_util

from flaxformer_lite.util import format_duration

# The fields every run shows first in the HParams tab, in this order: the model family,
# its size, the task. A sweep's swept fields follow them, then the parameter counts
# (COUNTS), then everything else.
KEY_FIELDS = ('model.name', 'model.size', 'task.name')
COUNTS = ('accounting.params_non_embedding', 'accounting.params_total')
# The `sweep` hyperparameter of a run that belongs to no sweep (every run declares it,
# so that TensorBoard's parallel coordinates keep single runs beside a sweep's trials).
NO_SWEEP = '-'


def hparam_columns(values: Mapping[str, Any], first: Sequence[str] = ()) -> list[tuple[str, api_pb2.HParamInfo]]:
    """The HParams tab's columns for `values` (a run's flattened config and counts), in
    the order a reader needs them: KEY_FIELDS, the fields in `first` (a sweep's swept
    fields), COUNTS, the rest; (field, column) pairs.

    TensorBoard orders the columns it is given by (`differs` first, then name) and ticks
    the first five, so the order is written into the names: KEY_FIELDS and COUNTS are
    named with a leading rank ('1 model.name', ..., '5 params_total'; shown under their
    own names), KEY_FIELDS and `first` are marked as differing, the rest not. A column's
    name depends on its field alone, so every run of a logdir (single runs and the trials
    of any sweep) holds a value for every column whichever run's declaration TensorBoard
    reads."""
    ranked = {f: i + 1 for i, f in enumerate(KEY_FIELDS + COUNTS)}
    shown = {f: f.split('.', 1)[1] if f in COUNTS else f for f in ranked}
    marked = set(KEY_FIELDS) | set(first)
    order = ([f for f in KEY_FIELDS if f in values] + [f for f in first if f in values and f not in ranked]
             + [f for f in COUNTS if f in values] + sorted(f for f in values if f not in ranked and f not in first))
    columns = []
    for field in order:
        value = _hparam_value(values[field])
        columns.append((field, api_pb2.HParamInfo(
            name=f'{ranked[field]} {shown[field]}' if field in ranked else field,
            display_name=shown.get(field, ''), type=_HPARAM_TYPES[type(value)],
            differs=field in marked and field not in COUNTS)))
    return columns


def trial_id(sweep: str, values: Mapping[str, Any], swept: Sequence[str]) -> str:
    """A sweep trial's short name in the HParams tab: 'tvl/lstm mini L16 s1' (the sweep,
    the family, 'xfmr' for the Transformer, then the swept values in short form: the
    size, the others, the seed). Every swept value appears, so the names of a sweep's
    trials differ, and the sweep's name keeps them apart from other sweeps' trials.
    Besides the family, values all trials share are left out: TensorBoard gives the name
    a column about 16 characters wide."""
    order = ('model.size', *(f for f in swept if f not in ('model.name', 'model.size', 'train.seed')), 'train.seed')
    fields = ['model.name', *(f for f in order if f in swept)]
    last = [f.rsplit('.', 1)[-1] for f in fields]
    parts = []
    for field in fields:
        if field not in values:
            continue
        label = SHORT_LABELS.get(field)
        if label is None:
            tail = field.rsplit('.', 1)[-1]
            label = (field if last.count(tail) > 1 else tail) + '='
        value = values[field]
        parts.append(label + (SHORT_FAMILIES.get(value, value) if field == 'model.name' else _short_value(value)))
    return f'{sweep}/' + ' '.join(parts)


# Families whose names alone would fill the trial name's column.
SHORT_FAMILIES = {'transformer': 'xfmr', 'linear_attention': 'linattn'}
# Short labels of swept values in trial names ('' : the value alone).
SHORT_LABELS = {'model.name': '', 'model.size': '', 'task.name': '', 'task.dependency_length': 'L',
                'task.seq_len': 'T', 'optim.learning_rate': 'lr', 'train.seed': 's', 'train.batch_size': 'bs',
                'train.steps': 'steps', 'model.num_layers': 'layers', 'model.d_model': 'd', 'model.num_heads': 'h',
                'model.d_ff': 'ff'}


def _short_value(value: Any) -> str:
    """0.003 -> '0.003', 3e-05 -> '3e-5', (16, 32) -> '16,32'; spaces become '_'."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return re.sub(r'e([+-])0*(\d)', r'e\1\2', f'{value:g}')
    if isinstance(value, (tuple, list)):
        return ','.join(_short_value(v) for v in value)
    return '_'.join(str(value).split()) or "''"


class Writer:
    """Appends summaries to an event file in `logdir` (one file per start of a run)."""

    def __init__(self, logdir: str):
        self._writer = EventFileWriter(logdir)

    def _add(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                               summary=summary_pb2.Summary(value=values)))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        meta = scalar_metadata.create_summary_metadata(display_name='', description='')
        self._add(step, [summary_pb2.Summary.Value(tag=tag, metadata=meta,
                                                   tensor=tensor_util.make_tensor_proto(float(v), dtype=np.float32))
                         for tag, v in values.items() if v is not None])

    def text(self, step: int, tag: str, markdown: str) -> None:
        meta = text_metadata.create_summary_metadata(display_name='', description='')
        self._add(step, [summary_pb2.Summary.Value(
            tag=tag, metadata=meta, tensor=tensor_util.make_tensor_proto(markdown, dtype=np.object_))])

    def image(self, step: int, tag: str, png: bytes, width: int, height: int) -> None:
        meta = image_metadata.create_summary_metadata(display_name='', description='', converted_to_tensor=True)
        tensor = tensor_util.make_tensor_proto([str(width).encode(), str(height).encode(), png], dtype=np.object_)
        self._add(step, [summary_pb2.Summary.Value(tag=tag, metadata=meta, tensor=tensor)])

    def hparams(self, values: Mapping[str, Any], metrics: Sequence[str], *, first: Sequence[str] = KEY_FIELDS,
                trial_id: str | None = None) -> None:
        """Declare the experiment (hyperparameters and the metrics this run logs) and this
        run's values; `first`: the fields shown right after KEY_FIELDS (`hparam_columns`),
        `trial_id`: the row's name (TensorBoard's default is a hash)."""
        columns = hparam_columns(values, first)
        by_name = {info.name: _hparam_value(values[field]) for field, info in columns}
        experiment = api_pb2.Experiment(
            hparam_infos=[info for _, info in columns], time_created_secs=time.time(),
            metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=m)) for m in metrics])
        declaration = summary_pb2.Summary(value=[summary_pb2.Summary.Value(
            tag=hparams_metadata.EXPERIMENT_TAG, tensor=hparams_metadata.NULL_TENSOR,
            metadata=hparams_metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(
                experiment=experiment)))])
        session = hparams_summary.hparams_pb(by_name, trial_id=trial_id)
        for pb in (declaration, session):
            self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=0, summary=pb))

    def restart_at(self, step: int) -> None:
        """Mark a resumed run: TensorBoard drops events of an earlier start at steps >= step,
        so a run resumed from an older checkpoint shows one clean curve."""
        self._writer.add_event(event_pb2.Event(
            wall_time=time.time(), step=int(step), session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class NullWriter(Writer):
    """For processes other than 0: they compute the same metrics but write nothing."""

    def __init__(self):  # pylint: disable=super-init-not-called
        pass

    def _add(self, step, values):
        pass

    def hparams(self, *args, **kwargs):
        pass

    def restart_at(self, step):
        pass

    def flush(self):
        pass

    def close(self):
        pass


_HPARAM_TYPES = {bool: api_pb2.DATA_TYPE_BOOL, float: api_pb2.DATA_TYPE_FLOAT64, str: api_pb2.DATA_TYPE_STRING}


def _hparam_value(v: Any) -> bool | float | str:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return 'None' if v is None else str(v)


def line_plot_png(y: np.ndarray, *, title: str, xlabel: str, ylabel: str) -> tuple[bytes, int, int]:
    """A small PNG line plot (matplotlib, Agg backend): (png, width, height)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(np.arange(len(y)), y)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format='png')
    width, height = fig.canvas.get_width_height()
    plt.close(fig)
    return buf.getvalue(), width, height


class Progress:
    """A bar with ETA on an interactive terminal; otherwise one line per logged step."""

    def __init__(self, total: int, start: int, *, stream: TextIO | None = None, enabled: bool = True):
        self.total, self.start = total, start
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, 'isatty') and self.stream.isatty()
        self._rate: float | None = None
        self._last_draw = 0.0
        self._last = ''

    def _eta(self, step: int, rate: float | None) -> str:
        if not rate:
            return '?'
        return format_duration((self.total - step) / rate)

    def update(self, step: int) -> None:
        """Called every step; redraws the bar at most 5 times a second (tty only)."""
        if not self.tty or time.time() - self._last_draw < 0.2:
            return
        self._last_draw = time.time()
        width = 30
        filled = int(width * step / max(self.total, 1))
        rate = f'{self._rate:.1f} steps/s ' if self._rate else ''
        self.stream.write(f'\r[{"#" * filled}{"." * (width - filled)}] {step}/{self.total} '
                          f'{rate}ETA {self._eta(step, self._rate)} {self._last}\x1b[K')
        self.stream.flush()

    def log(self, step: int, metrics: Mapping[str, float], steps_per_s: float | None = None) -> None:
        """A logged step: remembered for the bar, or printed as a line. `steps_per_s` is
        the training rate the loop measured (compilation, evaluation and checkpoints
        excluded), the same rate as `train/tokens_per_sec`."""
        if not self.enabled:
            return
        self._rate = steps_per_s or self._rate
        shown = ' '.join(f'{k.split("/")[-1]} {v:.4g}' for k, v in metrics.items())
        self._last = shown
        if not self.tty:
            rate = f' {self._rate:.2f} steps/s' if self._rate else ''
            self.stream.write(f'step {step}/{self.total} {shown}{rate} ETA {self._eta(step, self._rate)}\n')
            self.stream.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            self.stream.write(('\r\x1b[K' if self.tty else '') + text + '\n')
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write('\n')
            self.stream.flush()
