"""Scaling plots (loss against N and C, IsoFLOP profiles, N* against C) and the style all
report plots share: one colour per model family, fixed for the whole report.

Figures are built with `matplotlib.figure.Figure` and saved by the Agg renderer, so
nothing touches pyplot's global state (no backend switch for the caller's process).
A plot whose data is missing raises `Skip` with the reason the report prints.
"""

from __future__ import annotations

import io
import math
import struct
import textwrap
from typing import Iterable, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from flaxformer_lite.analysis.runs import Run
from flaxformer_lite.analysis.scaling import Scaling, label

# Known families keep their colour whatever else a report holds (tab10 order).
FAMILY_ORDER = ('transformer', 'lstm', 'gru', 'rnn', 'linear_attention', 'mamba', 'mingru', 'rwkv',
                's4', 'hyena')
MARKERS = ('o', 's', '^', 'D', 'v', 'P', 'X', '*')
LINESTYLES = ('-', '--', '-.', ':')


class Skip(Exception):
    """The runs lack what a plot needs; the message says what."""


def family_colors(families: Iterable[str]) -> dict[str, tuple]:
    """A colour per family: known families by FAMILY_ORDER, others after them by name."""
    palette = list(colormaps['tab10'].colors) + list(colormaps['Dark2'].colors)
    names = sorted(set(families))
    out, used = {}, set()
    for name in names:
        if name in FAMILY_ORDER and FAMILY_ORDER.index(name) < len(palette):
            out[name] = palette[FAMILY_ORDER.index(name)]
            used.add(FAMILY_ORDER.index(name))
    free = [i for i in range(len(palette)) if i not in used and i >= len(FAMILY_ORDER)]
    free += [i for i in range(len(palette)) if i not in used and i < len(FAMILY_ORDER)]
    for k, name in enumerate(n for n in names if n not in out):
        out[name] = palette[free[k % len(free)]]
    return out


def panels(n: int, *, width: float = 5.4, height: float = 4.0) -> tuple[Figure, list]:
    """A figure with n axes in rows of up to 3."""
    cols = min(max(n, 1), 3)
    rows = math.ceil(max(n, 1) / cols)
    fig = Figure(figsize=(width * cols, height * rows), dpi=100)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    return fig, axes


def finish(fig: Figure, title: str) -> None:
    """Title (wrapped to the figure's width) and a layout that keeps outside legends."""
    fig.suptitle(textwrap.fill(title, width=int(fig.get_figwidth() * 11)))
    fig.tight_layout()


def legend(ax, fontsize: int = 8) -> None:
    """Inside the axes for a few entries; beside them for many, so no line is hidden."""
    _, labels = ax.get_legend_handles_labels()
    if len(labels) > 6:
        ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        fig = ax.figure
        if not getattr(fig, 'widened_for_legend', False):  # room for the legend, once per figure
            fig.set_figwidth(fig.get_figwidth() * 1.35)
            fig.widened_for_legend = True
    elif labels:
        ax.legend(fontsize=fontsize)


def panel_legends(fig: Figure, axes: Sequence) -> None:
    """One legend per panel for a single panel; for several (their lines are the same),
    one legend right of the figure instead of a copy in each. Call after `finish`."""
    if len(axes) == 1:
        legend(axes[0])
        fig.tight_layout()
        return
    entries: dict[str, object] = {}
    for ax in axes:
        for handle, text in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(text, handle)
    if entries:
        fig.legend(list(entries.values()), list(entries), fontsize=7, loc='upper left',
                   bbox_to_anchor=(1.0, 0.93))


def quiet_minor_x(ax) -> None:
    """No labels on a log x axis's minor ticks: over one or two decades matplotlib labels
    2x, 3x, ... 9x of each, and they run into one another."""
    ax.xaxis.set_minor_formatter(NullFormatter())


def log_y(ax, values: Iterable[float]) -> None:
    """A log y axis; plain numbers on its ticks where the values span less than 20x
    (losses usually do, and '6x10^0' reads worse than '6')."""
    ax.set_yscale('log')
    v = [x for x in values if x is not None and np.isfinite(x) and x > 0]
    if v and max(v) / min(v) < 20:
        plain = FuncFormatter(lambda y, _: f'{y:.3g}')
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)


def png(fig: Figure) -> tuple[bytes, int, int]:
    """(PNG bytes, width, height) of a figure, rendered by Agg."""
    buf = io.BytesIO()
    fig.savefig(buf, format='png', bbox_inches='tight')  # keeps a legend beside the panels
    data = buf.getvalue()
    width, height = struct.unpack('>II', data[16:24])  # the IHDR chunk
    return data, width, height


def loss_unit(runs: Sequence[Run]) -> str:
    """' (nats/token)' for language-model losses, ' (nats/example)' for classifiers."""
    kinds = {r.record.get('kind') for r in runs if r.record.get('kind')}
    if kinds and kinds <= {'lm', 'seq2seq', 'mlm'}:
        return ' (nats/token)'
    if kinds == {'classify'}:
        return ' (nats/example)'
    return ''


def _by_context(scalings: Sequence[Scaling]) -> dict[str, list[Scaling]]:
    out: dict[str, list[Scaling]] = {}
    for s in scalings:
        out.setdefault(label('', s.context).lstrip(', '), []).append(s)
    return out


def _curve(ax, fit, x_lo: float, x_hi: float, color, text: str) -> None:
    x = np.geomspace(x_lo, x_hi, 120)
    ax.plot(x, fit.predict(x), color=color, lw=1.6, label=text)
    band = fit.band(x)
    if band is not None:
        ax.fill_between(x, band[0], band[1], color=color, alpha=0.18, lw=0)


def _power_text(name: str, var: str, fit) -> str:
    if not fit.ok:
        return f'{name} (not fitted)'
    p = fit.params
    return f'{name}: {p["E"]:.3g} + {p["A"]:.3g} {var}$^{{-{p["alpha"]:.3g}}}$'


def plot_loss_vs_params(scalings: Sequence[Scaling], colors: dict, runs: Sequence[Run]) -> Figure:
    """Loss against non-embedding parameters, log-log, with each family's law and band."""
    if not scalings:
        raise Skip('no family has finished runs at two or more sizes')
    groups = _by_context(scalings)
    fig, axes = panels(len(groups))
    for ax, (context, members) in zip(axes, groups.items()):
        for s in members:
            color = colors[s.family]
            ax.scatter(s.n, s.loss, color=color, s=22, zorder=3)
            lo, hi = s.n.min() / 1.5, s.n.max() * 1.5
            if s.params_fit.ok:
                _curve(ax, s.params_fit, lo, hi, color, _power_text(s.family, 'N', s.params_fit))
            else:
                ax.plot([], [], color=color, marker='o', ls='', label=f'{s.family} (not fitted)')
        ax.set(xscale='log', xlabel='non-embedding parameters N',
               ylabel=members[0].loss_metric + loss_unit(runs), title=context or None)
        quiet_minor_x(ax)
        log_y(ax, np.concatenate([s.loss for s in members]))
        ax.grid(alpha=0.3, which='both')
        legend(ax)
    finish(fig, 'Loss against model size (bands: bootstrap CI)')
    return fig


def plot_loss_vs_compute(scalings: Sequence[Scaling], colors: dict, runs: Sequence[Run]) -> Figure:
    """Loss against training FLOPs: every run faint, the Pareto frontier and its law."""
    with_c = [s for s in scalings if s.compute_fit is not None]
    if not with_c:
        raise Skip('no family has finished runs at two or more training budgets (train_flops)')
    groups = _by_context(with_c)
    fig, axes = panels(len(groups))
    for ax, (context, members) in zip(axes, groups.items()):
        for s in members:
            color = colors[s.family]
            ax.scatter(s.compute, s.compute_loss, color=color, s=14, alpha=0.35)
            fc, fl = s.compute[s.frontier], s.compute_loss[s.frontier]
            ax.plot(fc, fl, color=color, marker='o', ms=5, lw=0.8, ls=':')
            if s.compute_fit.ok:
                _curve(ax, s.compute_fit, fc.min() / 1.5, fc.max() * 1.5, color,
                       _power_text(s.family, 'C', s.compute_fit))
            else:
                ax.plot([], [], color=color, marker='o', ls='', label=f'{s.family} frontier (not fitted)')
        ax.set(xscale='log', xlabel='training compute C (FLOPs)',
               ylabel=members[0].loss_metric + loss_unit(runs), title=context or None)
        quiet_minor_x(ax)
        log_y(ax, np.concatenate([s.compute_loss for s in members]))
        ax.grid(alpha=0.3, which='both')
        legend(ax)
    finish(fig, 'Loss against training compute (frontier: lowest validation loss at or below each C)')
    return fig


def plot_isoflop(scalings: Sequence[Scaling], colors: dict, runs: Sequence[Run]) -> Figure:
    """Loss against N at each compute budget, the parabolas in log N and their minima."""
    with_iso = [s for s in scalings if s.isoflop is not None]
    if not with_iso:
        raise Skip('no compute budget holds finished runs at three or more sizes')
    fig, axes = panels(len(with_iso))
    for ax, s in zip(axes, with_iso):
        budgets = sorted(s.isoflop_data)
        shades = colormaps['viridis'](np.linspace(0.0, 0.85, len(budgets)))
        for shade, p in zip(shades, s.isoflop.parabolas):
            n, loss = s.isoflop_data[p.budget]
            ax.scatter(n, loss, color=shade, s=18, label=f'C = {p.budget:.2g} FLOPs')
            if p.n_points and np.isfinite(p.coef[0]):
                x = np.geomspace(n.min() / 1.3, n.max() * 1.3, 100)
                ax.plot(x, p.predict(x), color=shade, lw=1.2)
            if p.ok:
                ax.scatter([p.n_star], [p.loss_star], color=shade, marker='*', s=160, edgecolor='black',
                           zorder=4)
        ax.set(xscale='log', xlabel='non-embedding parameters N', ylabel=s.loss_metric + loss_unit(runs),
               title=f'{s.label} (stars: minima N*)')
        quiet_minor_x(ax)
        ax.grid(alpha=0.3, which='both')
        legend(ax, fontsize=7)
        for spine in ax.spines.values():
            spine.set_edgecolor(colors[s.family])
    finish(fig, 'IsoFLOP profiles: loss against size at fixed training compute')
    return fig


def plot_optimal_params(scalings: Sequence[Scaling], colors: dict, runs: Sequence[Run]) -> Figure:
    """The compute-optimal size N* of each budget against C, with the fitted N* ∝ C^a."""
    with_iso = [s for s in scalings if s.isoflop is not None and any(p.ok for p in s.isoflop.parabolas)]
    if not with_iso:
        raise Skip('no IsoFLOP profile has a minimum inside its sampled sizes')
    fig, (ax,) = panels(1, width=6.4, height=4.6)
    for i, s in enumerate(with_iso):
        color, marker = colors[s.family], MARKERS[i % len(MARKERS)]
        good = [p for p in s.isoflop.parabolas if p.ok]
        c = np.array([p.budget for p in good])
        ax.scatter(c, [p.n_star for p in good], color=color, marker=marker, s=36, zorder=3)
        law = s.isoflop.law
        if law.ok:
            lo, hi = law.intervals['a']
            text = f'{s.label}: N* ∝ C$^{{{law.params["a"]:.2f}}}$ [{lo:.2f}, {hi:.2f}]'
            _curve(ax, law, c.min() / 1.5, c.max() * 1.5, color, text)
        else:
            ax.plot([], [], color=color, marker=marker, ls='', label=f'{s.label} (law not fitted)')
    ax.set(xscale='log', yscale='log', xlabel='training compute C (FLOPs)',
           ylabel='compute-optimal non-embedding parameters N*')
    ax.grid(alpha=0.3, which='both')
    legend(ax)
    finish(fig, 'Compute-optimal model size (from the IsoFLOP minima)')
    return fig


SCALING_PLOTS = {'loss_vs_params': plot_loss_vs_params, 'loss_vs_compute': plot_loss_vs_compute,
                 'isoflop': plot_isoflop, 'optimal_params': plot_optimal_params}
