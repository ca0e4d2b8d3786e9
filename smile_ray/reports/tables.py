"""Markdown tables of results."""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from smile_ray.metrics import IL_METRICS
from smile_ray.stats import (BOOTSTRAP_MIN_N, IQM_MIN_RUNS, interval_method, iqm, min_detectable_effect, paired_stats,
                             stratified_bootstrap_ci)

MDE_LEGEND = ("MDE (80 %): the smallest mean difference (points) a two-sided paired t-test at p < 0.05 on these "
              "seeds would detect with 80 % power, from the observed spread of the paired differences "
              "(noncentral t); a difference below it is not evidence of no effect.")
IQM_LEGEND = (f"IQM: interquartile mean of the runs' test accuracy (%), the mean of the middle 50 % (Agarwal et al., "
              f"2021), with a 95 % stratified-bootstrap interval; shown only where a cell has at least {IQM_MIN_RUNS} "
              f"runs, since with fewer the middle half is three runs or fewer.")

ABLATION_LEGEND = ("diff = arm - reference in test accuracy (points), paired over seeds; 95 % CI of the mean "
                   f"difference: Student t below {BOOTSTRAP_MIN_N} seeds, percentile bootstrap from {BOOTSTRAP_MIN_N}; "
                   f"P(>ref): probability of improvement; p: paired t-test. {MDE_LEGEND} {IQM_LEGEND}")


def for_terminal(markdown: str) -> str:
    """A Markdown table as printed on a terminal: a cell's ``<br>`` (a line break in a
    rendered table, markup on a terminal) becomes ``; ``."""
    return markdown.replace("<br>", "; ")


def _fmt(x: float, spec: str = ".2f") -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, spec)


def iqm_cell(values_by_stratum: dict[Any, Sequence[float]]) -> str:
    """``IQM [low, high]`` of the pooled runs, the interval from the stratified bootstrap."""
    low, high = stratified_bootstrap_ci(values_by_stratum, iqm)
    pooled = np.concatenate([np.asarray(v, float) for v in values_by_stratum.values()])
    return f"{iqm(pooled):.2f} [{low:.2f}, {high:.2f}]"


def _iqm_note(smallest: int) -> str:
    return (f"\nIQM not shown: it needs at least {IQM_MIN_RUNS} runs per cell, and the smallest cell here has "
            f"{smallest}.\n")


def ablation_table(rows: list[dict[str, Any]], arms: list[str], reference: str) -> str:
    """Per samples_per_class and arm: mean ± std test accuracy (with each cell's run
    count where they differ) and statistics against ``reference`` over the seeds both
    ran, with the minimum detectable effect of the paired test and, from
    :data:`~smile_ray.stats.IQM_MIN_RUNS` runs per cell, the IQM."""
    sizes = sorted({r["samples_per_class"] for r in rows})
    cells = {(spc, a): {r["seed"]: 100 * r["test_acc"] for r in rows if r["arm"] == a and r["samples_per_class"] == spc}
             for spc in sizes for a in arms}
    paired = {len(set(v) & set(cells[spc, reference])) for (spc, a), v in cells.items() if a != reference and v}
    ci_kind = "/".join(sorted({interval_method(n) for n in paired})) or interval_method(0)
    smallest = min((len(v) for v in cells.values() if v), default=0)
    with_iqm = any(len(v) >= IQM_MIN_RUNS for v in cells.values())
    uneven = len({len(v) for v in cells.values() if v}) > 1
    head = (f"| samples/class | arm | test acc (mean ± std) | diff vs ref | 95 % CI ({ci_kind}) | P(>ref) | p "
            "| MDE (80 %) |")
    lines = [head + (" IQM [95 % CI] |" if with_iqm else ""), "|---" * (8 + with_iqm) + "|"]
    for spc in sizes:
        ref = cells[spc, reference]
        for arm in arms:
            acc = cells[spc, arm]
            vals = np.array([acc[s] for s in sorted(acc)])
            cell = f"{vals.mean():.2f} ± {vals.std(ddof=1):.2f}" + (f" (n={len(vals)})" if uneven else "")
            extra = ""
            if with_iqm:
                extra = f" {iqm_cell({arm: vals})} |" if len(vals) >= IQM_MIN_RUNS else " |"
            if arm == reference:
                lines.append(f"| {spc} | {arm} | {cell} | | | | | |" + extra)
                continue
            shared = sorted(set(ref) & set(acc))  # adaptive seeds: an arm that resolved stopped early
            s = paired_stats([ref[k] for k in shared], [acc[k] for k in shared])
            mde = min_detectable_effect([acc[k] - ref[k] for k in shared])
            lines.append(f"| {spc} | {arm} | {cell} | {s['diff']:+.2f} | [{s['ci_low']:+.2f}, {s['ci_high']:+.2f}] "
                         f"| {s['p_improve']:.2f} | {s['p_value']:.3f} | {_fmt(mde)} |" + extra)
    table = "\n".join(lines) + "\n"
    if smallest < IQM_MIN_RUNS:
        table += _iqm_note(smallest)
    return table


COMPARE_LEGEND = ("Cells: mean ± std test accuracy (%) over the shared seeds, the best mean per column in bold; "
                  "below each, the paired difference to the reference (points) with its 95 % CI "
                  f"(Student t below {BOOTSTRAP_MIN_N} seeds, percentile bootstrap from {BOOTSTRAP_MIN_N}), "
                  f"the paired t-test's p and the MDE. {MDE_LEGEND} {IQM_LEGEND} "
                  "'IQM, all columns' pools a method's runs over every column, resampled within each column.")


def ablation_title(base: dict[str, Any]) -> str:
    """An ablation's title (``ablation.md``'s heading and the report's), from its base config."""
    return (f"Ablation of {base.get('method')} on {base.get('dataset')} ({base.get('backbone')}, "
            f"{base.get('steps')} steps)")


def comparison_runs(base: dict[str, Any], varied: Sequence[str] = ()) -> str:
    """What every run of a comparison shares, from its base config: backbone, weights
    (only where no column sets its own; ``varied``: the keys the columns set), steps."""
    weights = "" if "weights" in varied else f"weights={base.get('weights')}, "
    return f"{base.get('backbone')}, {weights}{base.get('steps')} steps"


def comparison_title(base: dict[str, Any], varied: Sequence[str] = ()) -> str:
    """A comparison's title (``table.md``'s heading and the report's)."""
    return f"Methods compared on {base.get('dataset')} ({comparison_runs(base, varied)})"


#: what a comparison's methods are paired against: the paper's baseline (L2 fine-tuning)
REFERENCE = "l2"


def reference_method(methods: list[str]) -> str:
    """The comparison's reference: :data:`REFERENCE` where it is compared, else the first method."""
    return REFERENCE if REFERENCE in methods else methods[0]


def compare_table(rows: list[dict[str, Any]], methods: list[str], columns: list[str], reference: str) -> str:
    """The paper's Table 2 form: rows = methods, columns = settings; a cell is mean ± std
    test accuracy and the paired difference to ``reference`` on the seeds both have, with
    the paired test's minimum detectable effect; from
    :data:`~smile_ray.stats.IQM_MIN_RUNS` runs per cell also the IQM, and per method the
    IQM over all columns (stratified by column) where every column has that many."""
    acc = {(r["method"], r["setting"], r["seed"]): 100 * r["test_acc"] for r in rows}
    runs = {(m, c): [v for (mm, cc, _), v in acc.items() if mm == m and cc == c] for m in methods for c in columns}
    means = {k: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v))
             for k, v in runs.items() if v}
    best = {c: max((means[m, c][0] for m in methods if (m, c) in means), default=None) for c in columns}
    smallest = min((len(v) for v in runs.values() if v), default=0)
    overall = {m: iqm_cell({c: runs[m, c] for c in columns})
               for m in methods if len(columns) > 1 and all(len(runs[m, c]) >= IQM_MIN_RUNS for c in columns)}
    lines = ["| method | " + " | ".join(columns) + " |" + (" IQM, all columns |" if overall else ""),
             "|---|" + "---|" * (len(columns) + bool(overall))]
    for m in methods:
        cells = []
        for c in columns:
            if (m, c) not in means:
                cells.append("(failed)")
                continue
            mean, sd, n = means[m, c]
            cell = f"{mean:.2f} ± {sd:.2f}"
            if mean == best[c]:
                cell = f"**{cell}**"
            if m != reference:
                seeds = sorted(s for (mm, cc, s) in acc if mm == m and cc == c and (reference, c, s) in acc)
                if len(seeds) >= 2:
                    ref_vals, vals = [acc[reference, c, s] for s in seeds], [acc[m, c, s] for s in seeds]
                    st = paired_stats(ref_vals, vals)
                    mde = min_detectable_effect(np.subtract(vals, ref_vals))
                    cell += (f"<br>{st['diff']:+.2f} [{st['ci_low']:+.2f}, {st['ci_high']:+.2f}] "
                             f"p={st['p_value']:.3f} MDE {_fmt(mde)}")
            if n >= IQM_MIN_RUNS:
                cell += f"<br>IQM {iqm_cell({c: runs[m, c]})}"
            if n < max(means[mm, c][2] for mm in methods if (mm, c) in means):
                cell += f" (n={n})"
            cells.append(cell)
        if overall:
            cells.append(overall.get(m, ""))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    if smallest < IQM_MIN_RUNS:
        table += _iqm_note(smallest)
    return table


def il_table(rows: list[dict[str, Any]], group_keys: Sequence[str]) -> str:
    """Interpolation losses (paper, Eq. 1 and Table 4) per group of runs: mean ± std over
    the runs of Label-IL and Feature-IL on training and test images; '' if no row has them."""
    rows = [r for r in rows if all(isinstance(r.get(k), (int, float)) for k in IL_METRICS)]
    if not rows:
        return ""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in group_keys), []).append(r)
    names = {"label_il_train": "Label-IL train", "label_il_test": "Label-IL test",
             "feature_il_train": "Feature-IL train", "feature_il_test": "Feature-IL test"}
    lines = ["| " + " | ".join(group_keys) + " | runs | " + " | ".join(names[k] for k in IL_METRICS) + " |",
             "|---" * (len(group_keys) + 1 + len(IL_METRICS)) + "|"]
    for key, group in groups.items():
        cells = []
        for k in IL_METRICS:
            v = np.array([r[k] for r in group], float)
            cells.append(f"{v.mean():.4g} ± {v.std(ddof=1):.2g}" if len(v) > 1 else f"{v.mean():.4g}")
        lines.append("| " + " | ".join(map(str, key)) + f" | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


#: what a comparison's runs may differ in besides their column's other keys: never a
#: group of the paper's Fig. 1 form
_NOT_A_GROUP = ("samples_per_class", "seed", "method")


def size_differences(rows: list[dict[str, Any]], reference: str) -> list[dict[str, Any]]:
    """The paper's Fig. 1 form of a comparison: each method's paired difference to
    ``reference`` (test accuracy, points, over the seeds both have) against the
    training-set size, one series per method and per value of whatever else the columns
    vary (e.g. ``weights=imagenet`` / ``weights=none``). Rows carry ``method``,
    ``setting``, ``seed``, ``test_acc`` and ``config`` (a dict or its JSON). Empty unless
    the columns span at least two sizes. Each point: size, n, diff, ci_low, ci_high,
    p_value."""
    import json

    configs = [json.loads(r["config"]) if isinstance(r["config"], str) else r["config"] for r in rows]
    by_setting: dict[str, dict[str, Any]] = {}
    for r, c in zip(rows, configs):
        by_setting.setdefault(r["setting"], c)
    if len({c.get("samples_per_class") for c in by_setting.values()}) < 2:
        return []
    varied = sorted(k for k in set().union(*by_setting.values()) if k not in _NOT_A_GROUP
                    and len({json.dumps(c.get(k), sort_keys=True) for c in by_setting.values()}) > 1)
    group_of = {s: ", ".join(f"{k}={c.get(k)}" for k in varied) for s, c in by_setting.items()}
    acc = {(r["method"], r["setting"], r["seed"]): 100 * r["test_acc"] for r in rows}
    series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for setting, config in sorted(by_setting.items(), key=lambda kv: kv[1].get("samples_per_class")):
        for m in dict.fromkeys(r["method"] for r in rows):
            if m == reference:
                continue
            seeds = sorted(s for (mm, cc, s) in acc if mm == m and cc == setting and (reference, setting, s) in acc)
            if len(seeds) < 2:
                continue
            st = paired_stats([acc[reference, setting, s] for s in seeds], [acc[m, setting, s] for s in seeds])
            series.setdefault((m, group_of[setting]), []).append(
                {"size": config.get("samples_per_class"), "n": len(seeds), "diff": st["diff"],
                 "ci_low": st["ci_low"], "ci_high": st["ci_high"], "p_value": st["p_value"]})
    return [{"method": m, "group": g, "points": pts} for (m, g), pts in series.items()]


def size_difference_table(series: list[dict[str, Any]], reference: str) -> str:
    """:func:`size_differences` as Markdown: a row per method, group and size."""
    if not series:
        return ""
    lines = [f"| method | columns | images per class | seeds | diff vs {reference} | 95 % CI | p |",
             "|---|---|---|---|---|---|---|"]
    for s in series:
        for p in s["points"]:
            lines.append(f"| {s['method']} | {s['group'] or '-'} | {p['size']} | {p['n']} | {p['diff']:+.2f} | "
                         f"[{p['ci_low']:+.2f}, {p['ci_high']:+.2f}] | {p['p_value']:.3f} |")
    return "\n".join(lines) + "\n"
