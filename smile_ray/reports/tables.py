"""Markdown tables of results."""
from __future__ import annotations

from typing import Any

import numpy as np

from smile_ray.stats import BOOTSTRAP_MIN_N, interval_method, paired_stats

ABLATION_LEGEND = ("diff = arm - reference in test accuracy (points), paired over seeds; 95 % CI of the mean "
                   f"difference: Student t below {BOOTSTRAP_MIN_N} seeds, percentile bootstrap from {BOOTSTRAP_MIN_N}; "
                   "P(>ref): probability of improvement; p: paired t-test.")


def ablation_table(rows: list[dict[str, Any]], arms: list[str], reference: str) -> str:
    """Per samples_per_class and arm: mean ± std test accuracy and statistics against
    ``reference`` over the shared seeds."""
    n = len({r["seed"] for r in rows})
    lines = [f"| samples/class | arm | test acc (mean ± std) | diff vs ref | 95 % CI ({interval_method(n)}) | P(>ref) | p |",
             "|---|---|---|---|---|---|---|"]
    for spc in sorted({r["samples_per_class"] for r in rows}):
        by_arm = {a: {r["seed"]: 100 * r["test_acc"] for r in rows if r["arm"] == a and r["samples_per_class"] == spc}
                  for a in arms}
        ref = by_arm[reference]
        for arm in arms:
            acc = by_arm[arm]
            vals = np.array([acc[s] for s in sorted(acc)])
            cell = f"{vals.mean():.2f} ± {vals.std(ddof=1):.2f}"
            if arm == reference:
                lines.append(f"| {spc} | {arm} | {cell} | | | | |")
                continue
            s = paired_stats([ref[k] for k in sorted(ref)], [acc[k] for k in sorted(ref)])
            lines.append(f"| {spc} | {arm} | {cell} | {s['diff']:+.2f} | [{s['ci_low']:+.2f}, {s['ci_high']:+.2f}] "
                         f"| {s['p_improve']:.2f} | {s['p_value']:.3f} |")
    return "\n".join(lines) + "\n"


COMPARE_LEGEND = ("Cells: mean ± std test accuracy (%) over the shared seeds, the best mean per column in bold; "
                  "below each, the paired difference to the reference (points) with its 95 % CI "
                  f"(Student t below {BOOTSTRAP_MIN_N} seeds, percentile bootstrap from {BOOTSTRAP_MIN_N}) "
                  "and the paired t-test's p.")


def compare_table(rows: list[dict[str, Any]], methods: list[str], columns: list[str], reference: str) -> str:
    """The paper's Table 2 form: rows = methods, columns = settings; a cell is mean ± std
    test accuracy and the paired difference to ``reference`` on the seeds both have."""
    acc = {(r["method"], r["setting"], r["seed"]): 100 * r["test_acc"] for r in rows}
    means = {}
    for m in methods:
        for c in columns:
            vals = [v for (mm, cc, _), v in acc.items() if mm == m and cc == c]
            if vals:
                means[m, c] = (float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, len(vals))
    best = {c: max((means[m, c][0] for m in methods if (m, c) in means), default=None) for c in columns}
    lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
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
                    st = paired_stats([acc[reference, c, s] for s in seeds], [acc[m, c, s] for s in seeds])
                    cell += (f"<br>{st['diff']:+.2f} [{st['ci_low']:+.2f}, {st['ci_high']:+.2f}] "
                             f"p={st['p_value']:.3f}")
            if n < max(means[mm, c][2] for mm in methods if (mm, c) in means):
                cell += f" (n={n})"
            cells.append(cell)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
