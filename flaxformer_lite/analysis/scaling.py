"""Which runs feed which scaling fit: per model family, and per setting of the other
swept fields (a sweep over dependency lengths gets one law per length).

- L(N): final loss against non-embedding parameters. Tuned fields (swept `optim.*`, for
  example the learning rate) keep their best value at each size; where the runs also
  vary in training length, each size keeps the length with the lowest loss.
- L(C): the Pareto frontier of loss against training FLOPs (lowest loss at or below each
  compute), fitted with the same law.

Every such choice is made on the validation twin of the fitted loss (`eval/loss` for
`test/loss`, `tables.validation_metric`), and the fit takes the fitted loss of the runs
chosen: the test split chooses nothing.
- IsoFLOP: runs grouped by compute budget (`train.flops_budget` where recorded, else
  train_flops rounded to 2 significant digits), a parabola in log N per budget, N* ∝ C^a.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from flaxformer_lite.analysis import fits
from flaxformer_lite.analysis.runs import SEED_FIELDS, Run, hashable, varying_fields
from flaxformer_lite.analysis.tables import group_runs, keep_best_tuned, validation_metric, validation_score

# Fields that change how much a run trains, not what it learns.
COMPUTE_FIELDS = ('train.steps', 'train.flops_budget', 'train.batch_size', 'train.tokens')


@dataclasses.dataclass
class Scaling:
    """The fits of one family in one setting, with the points they were fitted to."""
    family: str
    context: dict[str, Any]
    loss_metric: str
    n: np.ndarray  # L(N) points
    loss: np.ndarray
    params_fit: fits.Fit
    compute: np.ndarray  # all (C, loss) points, and which of them make the frontier
    compute_loss: np.ndarray
    frontier: np.ndarray
    compute_fit: fits.Fit | None
    isoflop: fits.IsoFlopFit | None
    isoflop_data: dict[float, tuple[np.ndarray, np.ndarray]]
    notes: list[str]

    @property
    def label(self) -> str:
        return label(self.family, self.context)

    def to_dict(self) -> dict[str, Any]:
        return dict(family=self.family, context=self.context, loss_metric=self.loss_metric,
                    loss_vs_params=self.params_fit.to_dict(),
                    loss_vs_compute=self.compute_fit.to_dict() if self.compute_fit else None,
                    isoflop=self.isoflop.to_dict() if self.isoflop else None, notes=self.notes)


def label(family: str, context: dict[str, Any]) -> str:
    """'lstm' or 'lstm, dependency_length=64'."""
    return ', '.join([family] + [f'{k.rsplit(".", 1)[-1]}={v}' for k, v in context.items()])


def context_fields(runs: Sequence[Run], tuned: Sequence[str]) -> list[str]:
    """The varying fields that define a separate setting (not model, seed, compute or tuned)."""
    fields = [f for f in varying_fields(runs) if not f.startswith('model.') and f not in SEED_FIELDS
              and f not in COMPUTE_FIELDS and f not in tuned]
    if 'task.name' not in fields:
        fields.insert(0, 'task.name')
    return [f for f in fields if len({hashable(r.value(f)) for r in runs}) > 1]


def budget_of(run: Run) -> float | None:
    """The run's compute budget: the recorded one, else train_flops to 2 significant digits."""
    recorded = run.number('train.flops_budget')
    if recorded:
        return recorded
    flops = run.number('train_flops')
    return float(f'{flops:.2g}') if flops else None


def _compute_fields(runs: Sequence[Run]) -> list[str]:
    return [f for f in varying_fields(runs) if f in COMPUTE_FIELDS]


def _params_points(runs: Sequence[Run], metric: str, tuned: Sequence[str], notes: list[str],
                   chosen: set | None = None) -> tuple[np.ndarray, np.ndarray]:
    compute = _compute_fields(runs)
    runs = [r for r in runs if (r.number('params_non_embedding') or 0) > 0]
    runs = keep_best_tuned(runs, tuned, ['params_non_embedding'] + compute, metric, chosen)
    if compute:
        by_size = group_runs(runs, ['params_non_embedding'] + list(SEED_FIELDS))
        if any(len(group_runs(g, compute)) > 1 for g in by_size.values()):
            notes.append(f'L(N) takes at each size the training length ({", ".join(compute)}) with the lowest '
                         f'{validation_metric(metric)}, and its {metric}')
            runs = [min(g, key=lambda r: validation_score([r], metric, 'the training length of L(N)', chosen))
                    for g in by_size.values()]
    return (np.array([r.number('params_non_embedding') for r in runs], dtype=float),
            np.array([r.number(metric) for r in runs], dtype=float))


def _isoflop_data(runs: Sequence[Run], metric: str, tuned: Sequence[str],
                  chosen: set | None = None) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    """{budget: (N, loss)} for budgets holding 3 or more sizes."""
    by_budget: dict[float, list[Run]] = {}
    for run in runs:
        b = budget_of(run)
        if b and (run.number('params_non_embedding') or 0) > 0:
            by_budget.setdefault(b, []).append(run)
    out = {}
    for b, members in sorted(by_budget.items()):
        members = keep_best_tuned(members, tuned, ['params_non_embedding'], metric, chosen)
        if len({r.number('params_non_embedding') for r in members}) < 3:
            continue
        recorded = members[0].number('train.flops_budget')
        budget = recorded or float(np.mean([r.number('train_flops') for r in members]))
        out[budget] = (np.array([r.number('params_non_embedding') for r in members], dtype=float),
                       np.array([r.number(metric) for r in members], dtype=float))
    return out


def analyse(runs: Sequence[Run], loss_metric: str, *, tuned: Sequence[str] | None = None, n_boot: int = 300,
            seed: int = 0, level: float = 95.0, chosen: set | None = None) -> list[Scaling]:
    """The scaling fits of every (family, setting) whose finished runs span 2 or more sizes;
    `chosen` (when given) collects what was chosen on validation, and by which metric."""
    done = [r for r in runs if r.status == 'done' and r.number(loss_metric) is not None]
    if tuned is None:
        tuned = [f for f in varying_fields(done) if f.startswith('optim.')]
    contexts = context_fields(done, tuned)
    out = []
    for key, members in group_runs(done, ['model.name'] + contexts).items():
        if len({r.number('params_non_embedding') for r in members} - {None}) < 2:
            continue
        notes: list[str] = []
        n, loss = _params_points(members, loss_metric, tuned, notes, chosen)
        params_fit = fits.fit_power_law(n, loss, n_boot=n_boot, seed=seed, level=level)
        with_c = [r for r in members if (r.number('train_flops') or 0) > 0]
        c = np.array([r.number('train_flops') for r in with_c], dtype=float)
        c_loss = np.array([r.number(loss_metric) for r in with_c], dtype=float)
        compute_fit, frontier = None, np.zeros(0, dtype=int)
        if len(set(c)) >= 2:  # the frontier of the validation loss; the fit to those runs' loss_metric
            chooser = [validation_score([r], loss_metric, 'the L(C) frontier', chosen) for r in with_c]
            frontier = fits.pareto_frontier(c, chooser)
            compute_fit = fits.fit_power_law(c[frontier], c_loss[frontier], n_boot=n_boot, seed=seed, level=level)
        iso_data = _isoflop_data(members, loss_metric, tuned, chosen)
        isoflop = fits.fit_isoflop(iso_data, n_boot=n_boot, seed=seed, level=level) if iso_data else None
        out.append(Scaling(family=str(key[0]), context=dict(zip(contexts, key[1:])), loss_metric=loss_metric,
                           n=n, loss=loss, params_fit=params_fit, compute=c, compute_loss=c_loss,
                           frontier=frontier, compute_fit=compute_fit, isoflop=isoflop, isoflop_data=iso_data,
                           notes=notes))
    return out


def describe(s: Scaling) -> list[str]:
    """One line per fit, e.g. 'lstm: L(N) = 1.23 + 45.6 N^-0.31; alpha 95% CI [0.25, 0.37], ...'."""
    lines = [_describe_power(s.label, 'L(N)', 'N', s.params_fit, 'points')]
    if s.compute_fit is not None:
        lines.append(_describe_power(s.label, 'L(C)', 'C', s.compute_fit, 'frontier points'))
    if s.isoflop is not None:
        law = s.isoflop.law
        n_budgets = len(s.isoflop.parabolas)
        if law.ok:
            lo, hi = law.intervals['a']
            lines.append(f'{s.label}: N*(C) = {law.params["k"]:.3g} C^{law.params["a"]:.3g}; exponent '
                         f'{law.level:g}% CI [{lo:.3g}, {hi:.3g}] from {law.n_points} of {n_budgets} budgets')
        else:
            lines.append(f'{s.label}: N*(C) {law.reason} (of {n_budgets} budgets)')
        for p in s.isoflop.parabolas:
            if not p.ok:
                lines.append(f'{s.label}: budget C={p.budget:.3g} FLOPs: {p.reason}')
    return lines


def _describe_power(name: str, law_name: str, var: str, fit: fits.Fit, what: str) -> str:
    if not fit.ok:
        return f'{name}: {law_name} {fit.reason}'
    p, ci = fit.params, fit.intervals
    return (f'{name}: {law_name} = {p["E"]:.3g} + {p["A"]:.3g} {var}^-{p["alpha"]:.3g}; '
            f'alpha {fit.level:g}% CI [{ci["alpha"][0]:.3g}, {ci["alpha"][1]:.3g}], '
            f'E {fit.level:g}% CI [{ci["E"][0]:.3g}, {ci["E"][1]:.3g}] from {fit.n_points} {what}')

