"""Markdown tables: the MDE beside every paired difference, the IQM from 8 runs a cell."""
import numpy as np

from smile_ray.reports.tables import ablation_table, compare_table, for_terminal, il_table
from smile_ray.stats import iqm, min_detectable_effect, stratified_bootstrap_ci


def ablation_rows(seeds):
    return [{"arm": arm, "seed": s, "samples_per_class": 3, "test_acc": 0.6 + 0.01 * ((s * 3 + a) % 5) - 0.02 * a}
            for a, arm in enumerate(["full", "-x"]) for s in range(seeds)]


def line_of(table, start):
    return next(ln for ln in table.splitlines() if ln.startswith(start))


def test_ablation_table_gives_the_mde_and_says_why_there_is_no_iqm():
    rows = ablation_rows(3)
    table = ablation_table(rows, ["full", "-x"], "full")
    diffs = [100 * (b["test_acc"] - a["test_acc"]) for a, b in zip(rows[:3], rows[3:])]
    assert "| MDE (80 %) |" in table.splitlines()[0] and "IQM" not in table.splitlines()[0]
    assert line_of(table, "| 3 | -x |").endswith(f"| {min_detectable_effect(diffs):.2f} |")
    assert "IQM not shown: it needs at least 8 runs per cell, and the smallest cell here has 3." in table


def test_ablation_table_from_eight_seeds_gives_the_iqm_and_its_interval():
    rows = ablation_rows(8)
    table = ablation_table(rows, ["full", "-x"], "full")
    assert table.splitlines()[0].endswith("| MDE (80 %) | IQM [95 % CI] |") and "IQM not shown" not in table
    vals = [100 * r["test_acc"] for r in rows if r["arm"] == "-x"]
    low, high = stratified_bootstrap_ci({"-x": vals}, iqm)
    assert line_of(table, "| 3 | -x |").endswith(f"| {iqm(vals):.2f} [{low:.2f}, {high:.2f}] |")
    assert line_of(table, "| 3 | full |").count("[") == 1  # the reference: its IQM only


def test_compare_table_gives_the_mde_per_cell_and_the_iqm_over_columns():
    rows = [{"method": m, "setting": c, "seed": s, "test_acc": 0.5 + 0.1 * i + 0.05 * j + 0.01 * ((s * (i + 2)) % 4)}
            for i, m in enumerate(["l2", "smile"]) for j, c in enumerate(["a", "b"]) for s in range(8)]
    table = compare_table(rows, ["l2", "smile"], ["a", "b"], "l2")
    assert table.splitlines()[0] == "| method | a | b | IQM, all columns |"
    acc = {(r["method"], r["setting"], r["seed"]): 100 * r["test_acc"] for r in rows}
    diffs = [acc["smile", "a", s] - acc["l2", "a", s] for s in range(8)]
    smile = line_of(table, "| smile |")
    assert f"MDE {min_detectable_effect(diffs):.2f}" in smile
    by_column = {c: [acc["smile", c, s] for s in range(8)] for c in ("a", "b")}
    low, high = stratified_bootstrap_ci(by_column, iqm)
    assert smile.endswith(f"| {iqm(by_column['a'] + by_column['b']):.2f} [{low:.2f}, {high:.2f}] |")
    assert "IQM not shown" not in table
    # fewer than 8 seeds: no IQM anywhere, and a line saying why
    few = compare_table([r for r in rows if r["seed"] < 5], ["l2", "smile"], ["a", "b"], "l2")
    assert "IQM" not in few.splitlines()[0] and "<br>IQM" not in few and "smallest cell here has 5" in few


def test_a_table_printed_on_a_terminal_has_no_markup_in_its_cells():
    rows = [{"method": m, "setting": "a", "seed": s, "test_acc": 0.5 + 0.1 * i + 0.01 * s}
            for i, m in enumerate(["l2", "smile"]) for s in range(3)]
    table = compare_table(rows, ["l2", "smile"], ["a"], "l2")
    assert "<br>" in table  # a rendered Markdown table breaks the cell there
    shown = for_terminal(table)
    assert "<br>" not in shown and line_of(shown, "| smile |") == line_of(table, "| smile |").replace("<br>", "; ")


def test_il_table_by_hand():
    rows = [{"arm": "full", "label_il_train": 1.0, "label_il_test": 2.0, "feature_il_train": 3.0,
             "feature_il_test": 4.0},
            {"arm": "full", "label_il_train": 3.0, "label_il_test": 2.0, "feature_il_train": 3.0,
             "feature_il_test": 4.0},
            {"arm": "-x", "label_il_train": None}]  # a run without IL: left out
    table = il_table(rows, ["arm"])
    assert line_of(table, "| full |") == f"| full | 2 | 2 ± {np.sqrt(2):.2g} | 2 ± 0 | 3 ± 0 | 4 ± 0 |"
    assert "-x" not in table and il_table([{"arm": "a"}], ["arm"]) == ""
