"""Plots of studies and ablations, drawn with matplotlib's Agg backend (no display)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np



def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_study(rows: list[dict[str, Any]], study: Any, path: Path) -> Path:
    """The study's metric against each searched parameter, one panel per parameter; the
    best trial is starred and the base config's value is a dashed line."""
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
        base_value = getattr(study.base, p)
        if numeric or str(base_value) in labels:
            ax.axvline(pos(base_value), color="0.5", ls="--", lw=1, label="base config")
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
    handles, names = axes.flat[0].get_legend_handles_labels()
    spare = list(axes.flat)[len(params):]
    for ax in spare:
        ax.axis("off")
    if spare:
        spare[0].legend(handles, names, loc="center", fontsize=9)
    else:
        fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8)
    b = study.base
    fig.suptitle(f"{b.method} on {b.dataset} ({b.backbone}, {b.steps} steps): {study.metric} of {len(done)} trials")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ablation(rows: list[dict[str, Any]], arms: list[str], path: Path, title: str) -> Path:
    """What the ablation's statistics use: per data size, each arm's paired difference in
    test accuracy to the reference (the first arm) on every seed, and their mean with the
    table's 95 % interval; the zero line is "no effect"."""
    from smile_ray.stats import interval_method, paired_stats

    plt = _pyplot()
    sizes = sorted({r["samples_per_class"] for r in rows})
    ref, others = arms[0], arms[1:]
    fig, axes = plt.subplots(len(sizes), 1, figsize=(max(6.0, 1.0 * len(others) + 3.0), 3.4 * len(sizes) + 0.6),
                             squeeze=False)
    for ax, spc in zip(axes[:, 0], sizes):
        acc = {(r["arm"], r["seed"]): 100 * r["test_acc"] for r in rows if r["samples_per_class"] == spc}
        seeds = sorted({s for a, s in acc if a == ref})
        ax.axhline(0.0, color="0.4", lw=1, zorder=1)
        for i, arm in enumerate(others):
            diffs = [acc[(arm, s)] - acc[(ref, s)] for s in seeds if (arm, s) in acc]
            jitter = np.linspace(-0.12, 0.12, len(diffs)) if len(diffs) > 1 else [0.0]
            ax.scatter(i - 0.1 + np.asarray(jitter), diffs, s=16, color="tab:blue", alpha=0.8, zorder=2,
                       label="one seed: arm - " + ref if i == 0 else None)
            st = paired_stats([acc[(ref, s)] for s in seeds], [acc[(arm, s)] for s in seeds])
            ax.errorbar([i + 0.18], [st["diff"]], yerr=[[st["diff"] - st["ci_low"]], [st["ci_high"] - st["diff"]]],
                        fmt="o", color="black", capsize=3, zorder=3,
                        label=f"mean, 95 % CI ({interval_method(len(seeds))})" if i == 0 else None)
        ax.set_xticks(range(len(others)), others, rotation=20, ha="right")
        ax.set_xlim(-0.6, len(others) - 0.4)
        ax.set_ylabel(f"test acc. vs {ref} (points)")
        ax.set_title(f"{spc} samples/class, {len(seeds)} paired seeds")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_compare(rows: list[dict[str, Any]], methods: list[str], columns: list[str], path: Path, title: str) -> Path:
    """The comparison table as a picture: per column, each method's seeds (dots) and its
    mean with a 95 % t-interval of the mean (bar)."""
    from scipy import stats as sps

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(columns), figsize=(max(4.0, 0.8 * len(methods) + 2.0) * len(columns), 4.2),
                             squeeze=False)
    for ax, column in zip(axes[0], columns):
        for i, m in enumerate(methods):
            vals = np.array([100 * r["test_acc"] for r in rows if r["method"] == m and r["setting"] == column])
            if not len(vals):
                continue
            jitter = np.linspace(-0.12, 0.12, len(vals)) if len(vals) > 1 else np.zeros(1)
            ax.scatter(i - 0.1 + jitter, vals, s=14, color="tab:blue", alpha=0.7, zorder=2,
                       label="one seed" if i == 0 else None)
            half = (sps.t.ppf(0.975, len(vals) - 1) * vals.std(ddof=1) / np.sqrt(len(vals))) if len(vals) > 1 else 0.0
            ax.errorbar([i + 0.18], [vals.mean()], yerr=[[half], [half]], fmt="o", color="black", capsize=3, zorder=3,
                        label="mean, 95 % t-interval" if i == 0 else None)
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
        ax.set_xlim(-0.6, len(methods) - 0.4)
        ax.set_title(column)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(axis="y", alpha=0.3)
    handles = {}
    for ax in axes[0]:  # a column whose runs all failed has nothing to label
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    if handles:
        axes[0][-1].legend(handles.values(), handles.keys(), loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
                           frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
