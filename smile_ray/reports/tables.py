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
