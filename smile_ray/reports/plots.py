"""Plots of studies and ablations, drawn with matplotlib's Agg backend (no display)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from smile_ray.stats import mean_interval


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_study(rows: list[dict[str, Any]], study: Any, path: Path) -> Path:
    """The study's metric against each searched parameter, one panel per parameter; the
    best trial is marked."""
    plt = _pyplot()
    params = study.searched
    cols = min(3, len(params))
    nrows = math.ceil(len(params) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    done = [r for r in rows if r.get(study.metric) is not None]
    sign = 1 if study.mode == "max" else -1
    best = max(done, key=lambda r: sign * r[study.metric]) if done else None
    for ax, p in zip(axes.flat, params):
        xs = [r[p] for r in done]
        ys = [r[study.metric] for r in done]
        numeric = xs and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        labels = sorted({str(x) for x in xs})
        pos = (lambda x: x) if numeric else (lambda x: labels.index(str(x)))
        ax.scatter([pos(x) for x in xs], ys, s=18, label="trial")
        if best is not None:
            ax.scatter([pos(best[p])], [best[study.metric]], s=90, marker="*", color="tab:red", label="best", zorder=3)
        if numeric:
            kind = next(q.kind for q in study.space if q.name == p)
            if kind == "loguniform":
                ax.set_xscale("log")
                ax.minorticks_off()
        else:
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(p)
        ax.set_ylabel(study.metric)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(loc="best", fontsize=8)
    for ax in list(axes.flat)[len(params):]:
        ax.axis("off")
    b = study.base
    fig.suptitle(f"{b.method} on {b.dataset} ({b.backbone}, {b.steps} steps): {study.metric} of {len(done)} trials")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ablation(rows: list[dict[str, Any]], arms: list[str], path: Path, title: str) -> Path:
    """Test accuracy per arm and data size: one dot per seed, the same seed joined across
    arms (the pairing the statistics use), and the mean with its 95 % bootstrap interval."""
    plt = _pyplot()
    sizes = sorted({r["samples_per_class"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(max(5.0, 1.1 * len(arms) + 2.5) * len(sizes), 4.4), squeeze=False)
    for ax, spc in zip(axes[0], sizes):
        seeds = sorted({r["seed"] for r in rows if r["samples_per_class"] == spc})
        acc = {(r["arm"], r["seed"]): 100 * r["test_acc"] for r in rows if r["samples_per_class"] == spc}
        for s in seeds:
            ys = [acc.get((a, s), np.nan) for a in arms]
            ax.plot(range(len(arms)), ys, color="0.75", lw=0.8, zorder=1,
                    label="one seed (paired)" if s == seeds[0] else None)
            ax.scatter(range(len(arms)), ys, s=14, color="tab:blue", zorder=2,
                       label="test accuracy of a seed" if s == seeds[0] else None)
        for i, arm in enumerate(arms):
            vals = [acc[(arm, s)] for s in seeds if (arm, s) in acc]
            low, high = mean_interval(vals)
            mean = float(np.mean(vals))
            ax.errorbar([i + 0.18], [mean], yerr=[[mean - low], [high - mean]], fmt="o", color="black", capsize=3,
                        zorder=3, label="mean, 95 % bootstrap CI" if i == 0 else None)
        ax.set_xticks(range(len(arms)), arms, rotation=25, ha="right")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{spc} samples/class, {len(seeds)} seeds")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
