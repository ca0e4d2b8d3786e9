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
    legend_room = 0.0
    if spare:
        spare[0].legend(handles, names, loc="center", fontsize=9)
    else:  # below the panels, in a strip kept free of their axis labels
        fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8)
        legend_room = 0.35 / fig.get_figheight()
    b = study.base
    fig.suptitle(f"{b.method} on {b.dataset} ({b.backbone}, {b.steps} steps): {study.metric} of {len(done)} trials")
    fig.tight_layout(rect=(0, legend_room, 1, 1))
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
            shared = [s for s in seeds if (arm, s) in acc]  # adaptive seeds: an arm may stop early
            diffs = [acc[(arm, s)] - acc[(ref, s)] for s in shared]
            jitter = np.linspace(-0.12, 0.12, len(diffs)) if len(diffs) > 1 else [0.0]
            ax.scatter(i - 0.1 + np.asarray(jitter), diffs, s=16, color="tab:blue", alpha=0.8, zorder=2,
                       label="one seed: arm - " + ref if i == 0 else None)
            st = paired_stats([acc[(ref, s)] for s in shared], [acc[(arm, s)] for s in shared])
            ax.errorbar([i + 0.18], [st["diff"]], yerr=[[st["diff"] - st["ci_low"]], [st["ci_high"] - st["diff"]]],
                        fmt="o", color="black", capsize=3, zorder=3,
                        label=f"mean, 95 % CI ({interval_method(len(seeds))})" if i == 0 else None)
        ax.set_xticks(range(len(others)), others, rotation=20, ha="right")
        ax.set_xlim(-0.6, len(others) - 0.4)
        ax.set_ylabel(f"test acc. vs {ref} (points)")
        counts = sorted({sum((a, s) in acc for s in seeds) for a in others})
        ax.set_title(f"{spc} samples/class, {counts[0] if len(counts) == 1 else f'{counts[0]}-{counts[-1]}'} "
                     "paired seeds per arm")
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
            if not len(vals):  # every run of it failed: say so where its dots would be
                if any(r["setting"] == column for r in rows):
                    ax.text(i, 0.5, "no finished run", transform=ax.get_xaxis_transform(), rotation=90,
                            ha="center", va="center", fontsize=8, color="0.4")
                continue
            jitter = np.linspace(-0.12, 0.12, len(vals)) if len(vals) > 1 else np.zeros(1)
            ax.scatter(i - 0.1 + jitter, vals, s=14, color="tab:blue", alpha=0.7, zorder=2,
                       label="one seed" if i == 0 else None)
            half = (sps.t.ppf(0.975, len(vals) - 1) * vals.std(ddof=1) / np.sqrt(len(vals))) if len(vals) > 1 else 0.0
            low, high = max(0.0, vals.mean() - half), min(100.0, vals.mean() + half)  # accuracy lies in [0, 100]
            ax.errorbar([i + 0.18], [vals.mean()], yerr=[[vals.mean() - low], [high - vals.mean()]], fmt="o",
                        color="black", capsize=3, zorder=3,
                        label="mean, 95 % t-interval (within 0-100 %)" if i == 0 else None)
        if not any(r["setting"] == column for r in rows):
            ax.text(0.5, 0.5, "no finished runs", transform=ax.transAxes, ha="center", va="center", color="0.4")
            ax.set_yticks([])
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


# ------------------------------------------------------------------ single runs and their analyses


def run_title(config: dict[str, Any], seeds: int | None = None) -> str:
    """What was run, for a plot's title: method, dataset, backbone, steps, and the seed
    (or, for a group of runs, how many seeds)."""
    seed = f"{seeds} seeds" if seeds is not None else f"seed {config.get('seed')}"
    return (f"{config.get('method')} on {config.get('dataset')} ({config.get('backbone')}, "
            f"{config.get('steps')} steps, {seed})")


def pool_reliability(bins: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs' reliability data (:func:`smile_ray.metrics.reliability_bins`) as one:
    counts add up, per-bin confidence and accuracy are count-weighted means."""
    k = bins[0]["bins"]
    count = np.zeros(k)
    conf, acc = np.zeros(k), np.zeros(k)
    for b in bins:
        n = np.asarray(b["count"], float)
        count += n
        conf += n * np.array([c or 0.0 for c in b["confidence"]])
        acc += n * np.array([a or 0.0 for a in b["accuracy"]])
    some = count > 0
    return {"bins": k, "count": [int(c) for c in count],
            "confidence": [float(c / n) if s else None for c, n, s in zip(conf, count, some)],
            "accuracy": [float(a / n) if s else None for a, n, s in zip(acc, count, some)]}


def reliability_ece(reliability: dict[str, Any]) -> float:
    """``sum_b count_b / N * |accuracy_b - confidence_b|``: the ECE the bins hold."""
    n = sum(reliability["count"])
    return sum(c / n * abs(a - f) for c, a, f in zip(reliability["count"], reliability["accuracy"],
                                                      reliability["confidence"]) if c) if n else float("nan")


def plot_reliability(panels: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
    """Reliability diagrams (Guo et al., 2017), one panel per entry of ``panels``
    (label -> reliability data): per confidence bin the accuracy (bar) against the
    diagonal of perfect calibration and the bin's mean confidence (red, the gap drawn
    as a red line), and below, the share of the images in each bin. The ECE is in each
    panel's title."""
    plt = _pyplot()
    k = len(panels)
    cols = min(k, 4)
    rows = math.ceil(k / cols)
    fig = plt.figure(figsize=(max(4.6, 3.6 * cols), 4.6 * rows + 0.9), layout="constrained")
    outer = fig.add_gridspec(rows, cols)
    for idx, (label, rel) in enumerate(panels.items()):
        inner = outer[idx // cols, idx % cols].subgridspec(2, 1, height_ratios=[3, 1], hspace=0.05)
        ax = fig.add_subplot(inner[0])
        hist = fig.add_subplot(inner[1], sharex=ax)
        nb = rel["bins"]
        width = 1.0 / nb
        centres = (np.arange(nb) + 0.5) * width
        count = np.asarray(rel["count"], float)
        some = count > 0
        acc = np.array([a if a is not None else 0.0 for a in rel["accuracy"]])
        conf = np.array([c if c is not None else 0.0 for c in rel["confidence"]])
        ax.plot([0, 1], [0, 1], ls="--", color="0.3", lw=1, label="perfect calibration")
        ax.bar(centres[some], acc[some], width=width, color="tab:blue", alpha=0.8, edgecolor="black", lw=0.5,
               label="accuracy in bin")
        ax.vlines(centres[some], np.minimum(acc, conf)[some], np.maximum(acc, conf)[some], color="tab:red", lw=1.5)
        ax.scatter(centres[some], conf[some], marker="_", s=120, color="tab:red", lw=2, zorder=3,
                   label="mean confidence in bin (red line: the gap)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy (fraction correct)")
        ax.set_title(f"{label}\nECE {100 * reliability_ece(rel):.2f} % ({int(count.sum())} images)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelbottom=False)
        hist.bar(centres, count / max(count.sum(), 1), width=width, color="0.5", edgecolor="black", lw=0.5)
        hist.set_xlabel("confidence (max. softmax probability)")
        hist.set_ylabel("share of\nimages", fontsize=8)
        hist.grid(alpha=0.3)
        if idx == 0:
            handles, names = ax.get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=3 if cols > 1 else 1, fontsize=8, frameon=False)
    _suptitle(fig, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _suptitle(fig, title: str, fontsize: int = 10) -> None:
    """The figure's title, wrapped to its width (about 13 characters per inch at 10 pt)."""
    import textwrap

    width = int(fig.get_figwidth() * 130 / fontsize)
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in title.splitlines()), fontsize=fontsize)


def plot_run_reliability(metrics: dict[str, Any], path: Path) -> Path:
    """One run's reliability diagram on its test split, from its ``metrics.json``."""
    rel = metrics["reliability"]
    return plot_reliability({f"test split, {rel['bins']} confidence bins": rel}, path,
                            f"Reliability: {run_title(metrics.get('config', {}))}")


def plot_curves(groups: dict[str, list[list[dict[str, Any]]]], path: Path, title: str,
                highlight: str | None = None) -> Path:
    """Training curves from ``metrics.json`` histories: validation accuracy and training
    loss against the step. ``groups`` maps a label to its runs' histories; a group of
    several runs is drawn as thin lines per run and a thick line for their mean.
    ``highlight`` names a group drawn on top in red (e.g. a study's best trial)."""
    plt = _pyplot()
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    # red is the highlighted group's alone
    colours = [c for c in plt.colormaps["tab10"].colors if c != plt.colormaps["tab10"](3)[:3]]
    many = len(groups) > 10  # a study's trials: no legend entry each
    others = "other trials" if highlight is not None else "runs"  # the one legend entry of the grey lines
    for i, (label, histories) in enumerate(groups.items()):
        top = label == highlight
        colour = "tab:red" if top else ("0.6" if many else colours[i % len(colours)])
        for ax, key, scale in ((acc_ax, "val_acc", 100), (loss_ax, "train_loss", 1)):
            curves = [([h["step"] for h in hist if key in h], [scale * h[key] for h in hist if key in h])
                      for hist in histories]
            curves = [c for c in curves if c[0]]
            if not curves:
                continue
            lw = 2.2 if top else (0.8 if many else 1.8)
            if len(curves) > 1:
                for xs, ys in curves:
                    ax.plot(xs, ys, color=colour, lw=0.6, alpha=0.35)
                steps = sorted(set.intersection(*(set(xs) for xs, _ in curves)))
                mean = [np.mean([dict(zip(xs, ys))[s] for xs, ys in curves]) for s in steps]
                ax.plot(steps, mean, color=colour, lw=lw, marker="o", ms=3,
                        label=f"{label} (mean of {len(curves)})" if (top or not many) else None)
            else:
                xs, ys = curves[0]
                name = label if (top or not many) else others
                others = others if (top or not many or ax is loss_ax) else None
                ax.plot(xs, ys, color=colour, lw=lw, marker="o" if len(xs) < 30 else None, ms=3, label=name,
                        zorder=3 if top else 2)
    acc_ax.set_ylabel("validation accuracy (%)")
    loss_ax.set_ylabel("training loss (mean since last evaluation)")
    for ax in (acc_ax, loss_ax):
        ax.set_xlabel("training step (optimiser updates)")
        ax.grid(alpha=0.3)
    handles, names = acc_ax.get_legend_handles_labels()
    if handles:
        acc_ax.legend(fontsize=8, loc="lower right")
    _suptitle(fig, title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy_vs_size(rows: list[dict[str, Any]], group_key: str, path: Path, title: str,
                          size_key: str = "samples_per_class", value_key: str = "test_acc") -> Path:
    """The paper's Fig. 1 form: test accuracy (%) against training-set size, one line per
    ``group_key`` value (method or arm) through the mean over seeds at each size, with a
    band for the 95 % Student-t interval of that mean (none where a size has one run)."""
    from scipy import stats as sps

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    sizes = sorted({r[size_key] for r in rows})
    for group in dict.fromkeys(r[group_key] for r in rows):
        xs, mean, low, high = [], [], [], []
        for size in sizes:
            v = np.array([100 * r[value_key] for r in rows if r[group_key] == group and r[size_key] == size
                          and r.get(value_key) is not None], float)
            if not len(v):
                continue
            half = sps.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0
            xs.append(size)
            mean.append(v.mean())
            low.append(v.mean() - half)
            high.append(v.mean() + half)
        line, = ax.plot(xs, mean, marker="o", lw=1.8, label=str(group))
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.18, lw=0)
    if sizes and min(sizes) > 0 and max(sizes) / min(sizes) >= 8:
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("training images per class" if size_key == "samples_per_class" else size_key)
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title=f"{group_key} (mean, 95 % t-interval)", title_fontsize=8)
    _suptitle(fig, title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_difference_vs_size(series: list[dict[str, Any]], reference: str, path: Path, title: str) -> Path:
    """The paper's Fig. 1: a method's paired difference to ``reference`` (test accuracy,
    points) against training images per class, a line per method and column group
    (:func:`~smile_ray.reports.tables.size_differences`), each point's 95 % interval as
    a band, and the zero line (no difference)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    sizes = sorted({p["size"] for s in series for p in s["points"]})
    ax.axhline(0.0, color="0.3", lw=1, ls="--", zorder=1)
    for s in series:
        xs = [p["size"] for p in s["points"]]
        line, = ax.plot(xs, [p["diff"] for p in s["points"]], marker="o", lw=1.8, zorder=3,
                        label=f"{s['method']} - {reference}" + (f", {s['group']}" if s["group"] else ""))
        ax.fill_between(xs, [p["ci_low"] for p in s["points"]], [p["ci_high"] for p in s["points"]],
                        color=line.get_color(), alpha=0.18, lw=0, zorder=2)
    if sizes and min(sizes) > 0 and max(sizes) / min(sizes) >= 8:
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("training images per class")
    ax.set_ylabel(f"test accuracy minus {reference} (points)")
    ax.grid(alpha=0.3)
    n = sorted({p["n"] for s in series for p in s["points"]})
    ax.legend(fontsize=8, title=f"paired mean over {'/'.join(map(str, n))} seeds, 95 % interval",
              title_fontsize=8)
    _suptitle(fig, title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
