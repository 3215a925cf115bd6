"""Power-law fit of error against compute on the Pareto frontier of many runs, as Cherti et al. 2023 do for OpenCLIP
(ImageNet zero-shot error ~ 5.86 * C^-0.11).

- frontier: compute is binned in log10 space; each bin's lowest-error run is a frontier point, kept only when it
  beats every point of the lower-compute bins (a frontier never gets worse with more compute);
- fit: least squares of log(error) = log(beta) + alpha * log(C) over the frontier points;
- intervals: percentile bootstrap over the runs (resample runs with replacement, rebuild the frontier, refit).
"""

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence

import numpy as np


@dataclass(frozen=True)
class Point:
    compute: float  # GMACs in total: training GMACs per sample x samples seen
    error: float  # 1 - zero-shot top-1, in (0, 1]
    label: str = ""  # the run's name


def frontier(points: Sequence[Point], bins: int | None = None) -> List[Point]:
    """The binned-minimum Pareto frontier, in increasing compute. `bins`: equal-width bins over log10(compute)
    (default: one per distinct compute value, capped at 10); points with error <= 0 cannot be fitted and are
    left out."""
    pts = [p for p in points if p.error > 0 and p.compute > 0]
    if not pts:
        return []
    logs = np.log10([p.compute for p in pts])
    distinct = len(np.unique(np.round(logs, 9)))
    n_bins = bins or min(distinct, 10)
    lo, hi = float(logs.min()), float(logs.max())
    if hi - lo < 1e-12:
        return [min(pts, key=lambda p: p.error)]
    index = np.minimum(((logs - lo) / (hi - lo) * n_bins).astype(int), n_bins - 1)
    best: Dict[int, Point] = {}
    for i, p in zip(index.tolist(), pts):
        if i not in best or p.error < best[i].error:
            best[i] = p
    out: List[Point] = []
    for i in sorted(best):
        if not out or best[i].error < out[-1].error:
            out.append(best[i])
    return out


def fit_power_law(points: Sequence[Point]) -> Dict[str, float]:
    """Least squares in log-log: error = beta * compute^alpha. Returns {"alpha", "beta"}; needs >= 2 distinct
    compute values."""
    x = np.log([p.compute for p in points])
    y = np.log([p.error for p in points])
    if len(points) < 2 or np.ptp(x) == 0:
        raise ValueError("a power-law fit needs at least 2 frontier points with different compute")
    design = np.stack([np.ones_like(x), x], axis=1)
    (intercept, slope), *_ = np.linalg.lstsq(design, y, rcond=None)
    return {"alpha": float(slope), "beta": float(math.exp(intercept))}


def bootstrap(points: Sequence[Point], samples: int = 1000, bins: int | None = None, seed: int = 0,
              level: float = 0.95) -> Dict[str, Any]:
    """Percentile intervals of alpha and beta: runs resampled with replacement `samples` times, each resample's
    frontier refitted; resamples whose frontier has fewer than 2 points are skipped (their count is `used`)."""
    rng = np.random.default_rng(seed)
    pts = list(points)
    alphas, betas = [], []
    for _ in range(samples):
        pick = [pts[i] for i in rng.integers(0, len(pts), len(pts))]
        front = frontier(pick, bins)
        if len(front) < 2:
            continue
        fit = fit_power_law(front)
        alphas.append(fit["alpha"])
        betas.append(fit["beta"])
    if not alphas:
        return {"samples": samples, "used": 0, "alpha": None, "beta": None, "level": level}
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    return {"samples": samples, "used": len(alphas), "level": level,
            "alpha": [float(v) for v in np.percentile(alphas, q)], "beta": [float(v) for v in np.percentile(betas, q)]}


def predict(fit: Dict[str, float], compute: float) -> float:
    return fit["beta"] * compute ** fit["alpha"]


def scaling_fit(points: Sequence[Point], bins: int | None = None, bootstrap_samples: int = 1000,
                seed: int = 0) -> Dict[str, Any]:
    """Frontier, fit, bootstrap intervals and extrapolations at 10x and 100x the largest compute (the `fit` object of
    sweep.json). Fewer than 2 frontier points: {"frontier": [...], "error": why}."""
    front = frontier(points, bins)
    out: Dict[str, Any] = {"frontier": [p.label for p in front]}
    if len(front) < 2:
        out["error"] = f"{len(front)} frontier point(s): a fit needs at least 2 runs with different compute"
        return out
    fit = fit_power_law(front)
    ci = bootstrap(points, bootstrap_samples, bins, seed)
    c_max = max(p.compute for p in points)
    out.update(alpha=fit["alpha"], beta=fit["beta"], alpha_interval=ci["alpha"], beta_interval=ci["beta"],
               interval_level=ci["level"], bootstrap_samples=ci["samples"], bootstrap_used=ci["used"],
               extrapolated={f"{k}x": {"compute": k * c_max, "error": predict(fit, k * c_max)} for k in (10, 100)})
    return out


def plot_scaling(points: Sequence[Point], groups: Sequence[str], fit: Dict[str, Any], path: str,
                 title: str = "") -> None:
    """Error vs compute (log-log): every run a point coloured by `groups` (its model), the frontier and the fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name in dict.fromkeys(groups):
        mine = [p for p, g in zip(points, groups) if g == name]
        ax.scatter([p.compute for p in mine], [p.error for p in mine], label=name, s=36, zorder=3)
    on_front = [p for p in points if p.label in set(fit.get("frontier", []))]
    on_front.sort(key=lambda p: p.compute)
    if on_front:
        ax.plot([p.compute for p in on_front], [p.error for p in on_front], "k--", lw=1, label="Pareto frontier")
    if "alpha" in fit:
        c_lo = min(p.compute for p in points)
        c_hi = max(p.compute for p in points) * 100
        xs = np.logspace(math.log10(c_lo), math.log10(c_hi), 100)
        label = f"fit: {fit['beta']:.3g} * C^{fit['alpha']:.3f}"
        if fit.get("alpha_interval"):
            lo, hi = fit["alpha_interval"]
            label += f"  (alpha {lo:.3f}..{hi:.3f})"
        ax.plot(xs, fit["beta"] * xs ** fit["alpha"], "r-", lw=1.5, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2f"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.2f"))
    ax.set_xlabel("training compute C (GMACs = GMACs per sample x samples seen)")
    ax.set_ylabel("zero-shot top-1 error")
    ax.set_title(title or "error vs compute")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
