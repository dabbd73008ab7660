"""Scaling-law fits with bootstrap intervals; numbers in, numbers out (no runs, no files).

`fit_power_law` fits L(x) = E + A x^-alpha as Hoffmann et al. (2022, "Chinchilla",
Appendix D.2) do: minimise the Huber loss (delta 1e-3) between log(E + A x^-alpha),
computed as logsumexp(e, a - alpha log x) with E = e^e, A = e^a, and log L, by L-BFGS-B
from a grid of starting points, keeping the best. The Huber loss on log L keeps one
badly trained run from dragging the law. Intervals are bootstrap percentiles: resample
the points with replacement, refit, and read the quantiles (seeded, so reports repeat).

`fit_isoflop` fits a parabola in log N to loss at each compute budget, takes its minimum
N*(C) and fits N* = k C^a in log-log by least squares (Chinchilla's approach 2).

A fit the data cannot support comes back with `ok=False` and a `reason` such as
"not fitted: 2 points, need at least 4"; callers print the reason, never the numbers.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import glob
import math
import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import scipy
from scipy import optimize

HUBER_DELTA = 1e-3
ALPHA_MAX = 3.0
# A parabola's minimum counts if it lies within the sampled log-N range widened by this
# fraction of its width on each side ("inside or near"); further out it is extrapolation.
VERTEX_MARGIN = 0.25


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the enclosed fits with one OpenBLAS thread (numpy's and scipy's), then restore.

    L-BFGS-B makes thousands of tiny BLAS calls; on a busy machine OpenBLAS's threads
    spin between them, and one bootstrap fit took 0.6-24 s instead of 0.6-1.1 s (measured
    on the shared 2-core CPU). Where the libraries cannot be found this does nothing."""
    pools = []
    for module in (np, scipy):
        pattern = os.path.join(os.path.dirname(os.path.dirname(module.__file__)), f'{module.__name__}.libs',
                               '*openblas*.so*')
        for path in glob.glob(pattern):
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for suffix in ('', '64_'):
                get = getattr(lib, f'scipy_openblas_get_num_threads{suffix}', None)
                put = getattr(lib, f'scipy_openblas_set_num_threads{suffix}', None)
                if get is not None and put is not None:
                    pools.append((put, get()))
                    put(1)
                    break
    try:
        yield
    finally:
        for put, threads in pools:
            put(threads)


@dataclasses.dataclass
class Fit:
    """One fitted law: `params` (E, A, alpha for L = E + A x^-alpha; k, a for N* = k C^a),
    percentile `intervals` per parameter, and the bootstrap parameter `samples`."""
    law: str  # 'power_law' | 'optimal_params'
    ok: bool
    reason: str = ''
    n_points: int = 0
    params: dict[str, float] = dataclasses.field(default_factory=dict)
    intervals: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    samples: np.ndarray | None = None  # (n_ok_resamples, n_params), columns in `params` order
    level: float = 95.0
    n_boot: int = 0

    def predict(self, x: np.ndarray, params: Sequence[float] | None = None) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        p = list(self.params.values()) if params is None else list(params)
        if self.law == 'power_law':
            return p[0] + p[1] * x ** -p[2]
        return p[0] * x ** p[1]

    def band(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Pointwise percentile band of the bootstrap curves at `x` (None without samples)."""
        if self.samples is None or len(self.samples) < 2:
            return None
        curves = np.stack([self.predict(x, s) for s in self.samples])
        tail = (100 - self.level) / 2
        lo, hi = np.percentile(curves, [tail, 100 - tail], axis=0)
        return lo, hi

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(law=self.law, ok=self.ok, n_points=self.n_points)
        if self.ok:
            out.update(params=dict(self.params), level=self.level, n_boot=self.n_boot,
                       intervals={k: [float(v[0]), float(v[1])] for k, v in self.intervals.items()})
        else:
            out['reason'] = self.reason
        return out


def _huber_objective(theta: np.ndarray, lx: np.ndarray, ly: np.ndarray,
                     delta: float) -> tuple[float, np.ndarray]:
    """Huber(log(e^e + e^(a - alpha lx)) - ly) summed, divided by delta, and its gradient."""
    e, a, alpha = theta
    u = a - alpha * lx
    m = np.maximum(e, u)
    pe, pu = np.exp(e - m), np.exp(u - m)
    s = pe + pu
    r = m + np.log(s) - ly
    quad = np.abs(r) <= delta
    loss = np.where(quad, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))
    g = np.where(quad, r, delta * np.sign(r))
    wu = pu / s
    grad = np.array([np.sum(g * pe / s), np.sum(g * wu), -np.sum(g * wu * lx)])
    return float(loss.sum() / delta), grad / delta


def _grid_objective(starts: np.ndarray, lx: np.ndarray, ly: np.ndarray, delta: float) -> np.ndarray:
    """The objective at many starting points at once: (K, 3) -> (K,)."""
    e, a, alpha = (starts[:, i:i + 1] for i in range(3))
    pred = np.logaddexp(e, a - alpha * lx[None])
    r = np.abs(pred - ly[None])
    return np.where(r <= delta, 0.5 * r * r, delta * (r - 0.5 * delta)).sum(1)


def _grid(lx: np.ndarray, ly: np.ndarray) -> np.ndarray:
    """Starting points: E below the lowest loss at several depths, alpha from 0.05 to 1.5,
    and for each pair the A that puts the curve through the data's median excess loss."""
    y = np.exp(ly)
    starts = []
    for frac in (0.02, 0.2, 0.5, 0.8, 0.95):
        E = frac * y.min()
        for alpha in (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5):
            A = np.median(np.maximum(y - E, 1e-12 * y) * np.exp(alpha * lx))
            starts.append((math.log(E), math.log(A), alpha))
    return np.array(starts)


def _fit_once(lx: np.ndarray, ly: np.ndarray, starts: np.ndarray, delta: float) -> np.ndarray | None:
    """The best L-BFGS-B result over `starts` (None if none converged)."""
    bounds = [(float(ly.min()) - 15.0, float(ly.max()) + 1.0), (-40.0, 40.0), (0.0, ALPHA_MAX)]
    best, best_f = None, math.inf
    for x0 in starts:
        x0 = np.clip(x0, [b[0] for b in bounds], [b[1] for b in bounds])
        res = optimize.minimize(_huber_objective, x0, args=(lx, ly, delta), jac=True, method='L-BFGS-B',
                                bounds=bounds, options=dict(maxiter=500, ftol=1e-13, gtol=1e-10))
        if (res.success or res.status == 2) and np.all(np.isfinite(res.x)) and res.fun < best_f:
            best, best_f = res.x, res.fun  # status 2: stopped on precision loss at a minimum
    return best


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = (100 - level) / 2
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def _not_fitted(law: str, n: int, reason: str) -> Fit:
    return Fit(law=law, ok=False, reason=f'not fitted: {reason}', n_points=n)


@one_blas_thread()
def fit_power_law(x: Sequence[float], y: Sequence[float], *, n_boot: int = 300, seed: int = 0,
                  level: float = 95.0, delta: float = HUBER_DELTA, starts: int = 8) -> Fit:
    """L = E + A x^-alpha through points (x, y) (x > 0, y > 0); see the module docstring.

    Needs 4 distinct x values (3 parameters + 1). x is scaled by its geometric mean inside
    the fit so that a and alpha are not tied together by a huge log x."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    x, y = x[keep], y[keep]
    n, distinct = len(x), len(np.unique(x))
    if distinct < 4:
        return _not_fitted('power_law', n, f'{n} points, need at least 4' if n == distinct else
                           f'{n} points at {distinct} distinct values, need at least 4')
    lx0 = float(np.mean(np.log(x)))
    lx, ly = np.log(x) - lx0, np.log(y)
    grid = _grid(lx, ly)
    order = np.argsort(_grid_objective(grid, lx, ly, delta))
    theta = _fit_once(lx, ly, grid[order[:starts]], delta)
    if theta is None:
        return _not_fitted('power_law', n, f'the optimiser did not converge on {n} points')
    if theta[2] <= 1e-3:
        return _not_fitted('power_law', n, f'the loss does not fall with x over {n} points (alpha = 0)')
    if theta[2] >= ALPHA_MAX - 1e-3:
        return _not_fitted('power_law', n, f'alpha runs to its bound {ALPHA_MAX:g} ({n} points)')

    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        if len(np.unique(x[idx])) < 3:
            continue
        bx, by = lx[idx], ly[idx]
        # Warm start from the full fit; add the best grid point only where it starts lower.
        values = _grid_objective(np.vstack([theta[None], grid]), bx, by, delta)
        best = int(np.argmin(values[1:]))
        t = _fit_once(bx, by, theta[None] if values[0] <= values[1 + best] else
                      np.stack([theta, grid[best]]), delta)
        if t is not None:
            samples.append(t)
    if len(samples) < max(n_boot // 2, 2):
        return _not_fitted('power_law', n, f'only {len(samples)} of {n_boot} bootstrap refits converged')

    def natural(t: np.ndarray) -> np.ndarray:  # (e, a', alpha) -> (E, A, alpha), undoing the x scale
        t = np.atleast_2d(t)
        return np.stack([np.exp(t[:, 0]), np.exp(t[:, 1] + t[:, 2] * lx0), t[:, 2]], axis=1)

    est, boot = natural(theta)[0], natural(np.array(samples))
    names = ('E', 'A', 'alpha')
    intervals = {k: _interval(boot[:, i], level) for i, k in enumerate(names)}
    bad = [k for k, (lo, hi) in intervals.items()
           if not (math.isfinite(lo) and math.isfinite(hi)) or hi - lo <= 1e-9 * max(1.0, abs(hi))]
    if bad:
        return _not_fitted('power_law', n, f'degenerate bootstrap interval for {", ".join(bad)} ({n} points)')
    return Fit(law='power_law', ok=True, n_points=n, params=dict(zip(names, map(float, est))),
               intervals=intervals, samples=boot, level=level, n_boot=n_boot)


def pareto_frontier(x: Sequence[float], y: Sequence[float]) -> np.ndarray:
    """Indices of the points with lower y than every point at or below their x, by x."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    out, best = [], math.inf
    for i in np.lexsort((y, x)):
        if np.isfinite(y[i]) and y[i] < best:
            out.append(i)
            best = y[i]
    return np.array(out, dtype=int)


@dataclasses.dataclass
class Parabola:
    """loss = c2 (log N)^2 + c1 log N + c0 at one compute budget, and its minimum N*."""
    budget: float
    ok: bool
    reason: str = ''
    n_points: int = 0
    coef: tuple[float, float, float] = (math.nan, math.nan, math.nan)  # c2, c1, c0 (natural log)
    n_range: tuple[float, float] = (math.nan, math.nan)
    n_star: float = math.nan
    loss_star: float = math.nan

    def predict(self, n: np.ndarray) -> np.ndarray:
        return np.polyval(self.coef, np.log(np.asarray(n, dtype=float)))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(budget=self.budget, ok=self.ok, n_points=self.n_points)
        out.update(dict(n_star=self.n_star, loss_star=self.loss_star) if self.ok else dict(reason=self.reason))
        return out


def fit_parabola(n: Sequence[float], loss: Sequence[float], budget: float) -> Parabola:
    """A parabola in log N; its minimum counts only if convex and inside or near the samples."""
    n, loss = np.asarray(n, dtype=float), np.asarray(loss, dtype=float)
    keep = np.isfinite(n) & np.isfinite(loss) & (n > 0)
    n, loss = n[keep], loss[keep]
    count, distinct = len(n), len(np.unique(n))
    if count < 4 or distinct < 3:
        return Parabola(budget, False, f'not fitted: {count} points at {distinct} sizes, need at least 4 '
                                       f'points at 3 sizes', count)
    ln = np.log(n)
    coef = tuple(float(c) for c in np.polyfit(ln, loss, 2))
    lo, hi = float(ln.min()), float(ln.max())
    out = Parabola(budget, False, '', count, coef, (math.exp(lo), math.exp(hi)))
    if not coef[0] > 0:
        out.reason = 'no minimum: the parabola is not convex'
        return out
    vertex = -coef[1] / (2 * coef[0])
    margin = VERTEX_MARGIN * (hi - lo)
    if not lo - margin <= vertex <= hi + margin:
        out.reason = (f'no minimum: the parabola\'s minimum N={math.exp(vertex):.3g} lies outside the '
                      f'sampled range [{math.exp(lo):.3g}, {math.exp(hi):.3g}]')
        return out
    out.ok, out.n_star, out.loss_star = True, math.exp(vertex), float(np.polyval(coef, vertex))
    return out


@dataclasses.dataclass
class IsoFlopFit:
    """The parabola at each budget and the law N* = k C^a through their minima."""
    parabolas: list[Parabola]
    law: Fit

    def to_dict(self) -> dict[str, Any]:
        return dict(parabolas=[p.to_dict() for p in self.parabolas], law=self.law.to_dict())


def _optimal_law(parabolas: Sequence[Parabola]) -> tuple[float, float] | None:
    good = [p for p in parabolas if p.ok]
    if len(good) < 3:
        return None
    slope, intercept = np.polyfit(np.log([p.budget for p in good]), np.log([p.n_star for p in good]), 1)
    return float(math.exp(intercept)), float(slope)


@one_blas_thread()
def fit_isoflop(profiles: Mapping[float, tuple[Sequence[float], Sequence[float]]], *, n_boot: int = 300,
                seed: int = 0, level: float = 95.0) -> IsoFlopFit:
    """{budget C: (N values, losses)} -> parabolas and N* = k C^a with a bootstrap interval on a.

    The bootstrap resamples the runs within each budget and refits every parabola, so the
    interval carries the uncertainty of each minimum; it needs 3 budgets with a minimum."""
    budgets = sorted(profiles)
    data = {c: (np.asarray(profiles[c][0], dtype=float), np.asarray(profiles[c][1], dtype=float)) for c in budgets}
    parabolas = [fit_parabola(*data[c], budget=c) for c in budgets]
    n_good = sum(p.ok for p in parabolas)
    point = _optimal_law(parabolas)
    if point is None:
        return IsoFlopFit(parabolas, _not_fitted('optimal_params', n_good,
                                                 f'{n_good} budgets with a minimum, need at least 3'))
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_boot):
        resampled = []
        for c in budgets:
            n, loss = data[c]
            idx = rng.integers(0, len(n), len(n))
            resampled.append(fit_parabola(n[idx], loss[idx], c))
        law = _optimal_law(resampled)
        if law is not None:
            samples.append(law)
    if len(samples) < max(n_boot // 2, 2):
        return IsoFlopFit(parabolas, _not_fitted(
            'optimal_params', n_good, f'only {len(samples)} of {n_boot} bootstrap refits had 3 budgets with a minimum'))
    boot = np.array(samples)
    intervals = {'k': _interval(boot[:, 0], level), 'a': _interval(boot[:, 1], level)}
    lo, hi = intervals['a']
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi - lo <= 1e-9:
        return IsoFlopFit(parabolas, _not_fitted('optimal_params', n_good, 'degenerate bootstrap interval for a'))
    law = Fit(law='optimal_params', ok=True, n_points=n_good, params={'k': point[0], 'a': point[1]},
              intervals=intervals, samples=boot, level=level, n_boot=n_boot)
    return IsoFlopFit(parabolas, law)
