"""``smile-ray report``: output directories of train, tune, ablate and compare, built here
in their real formats (no Ray), turned into one Markdown report with its plots."""
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from smile_ray.cli import main
from smile_ray.config import make_config
from smile_ray.metrics import reliability_bins
from smile_ray.reports.plots import plot_accuracy_vs_size, plot_curves, plot_reliability, pool_reliability
from smile_ray.reports.report import build_report

STEPS = 300


def fake_metrics(config: dict, acc: float, seed: int) -> dict:
    """A metrics.json as the recipe writes it (the keys, their types, real reliability bins)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (200,), generator=g)
    logits = torch.randn(200, 5, generator=g) + 3.0 * acc * torch.nn.functional.one_hot(labels, 5)
    rng = np.random.default_rng(seed)
    history = [{"step": s, "train_loss": float(2.0 / (1 + s / 100) + rng.normal(0, 0.02)), "lr": 0.01,
                "val_acc": float(min(1.0, acc * s / STEPS + rng.normal(0, 0.01))), "val_ece": 0.1}
               for s in range(100, STEPS + 1, 100)]
    return {
        "method": config["method"], "dataset": config["dataset"], "val_acc": acc, "val_ece": 0.1,
        "test_acc": acc, "test_ece": 0.08, "test_nll": 0.9,
        "label_il_train": float(0.5 + rng.random()), "label_il_test": float(0.8 + rng.random()),
        "feature_il_train": float(1.0 + rng.random()), "feature_il_test": float(1.5 + rng.random()),
        "interpolation": {"pairs": 256, "lambdas": [0.25, 0.5, 0.75], "seconds": 0.4},
        "reliability": reliability_bins(logits, labels),
        "steps": STEPS, "seconds": 12.5, "workers": 1, "threads": 1, "resumed_from": [],
        "source_weights": "source", "split_sizes": {"train": 25, "val": 100, "test": 359},
        "method_info": {}, "history": history, "config": config,
    }


def write_json(obj, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def train_dir(path, seed=2022, method="smile"):
    config = make_config({"method": method, "seed": seed}).to_dict()
    write_json(fake_metrics(config, 0.8, seed), path / "metrics.json")
    return path


def ablation_dir(path, seeds=3, sizes=(3,), arms=("full", "-source_label", "-feature_mixup")):
    rows = []
    overrides = {"full": {}, "-source_label": {"source_label": False}, "-feature_mixup": {"feature_mixup": False}}
    for spc in sizes:
        for a, arm in enumerate(arms):
            for seed in range(seeds):
                config = make_config({"seed": seed, "samples_per_class": spc, **overrides[arm]}).to_dict()
                acc = 0.6 + 0.02 * spc - 0.03 * a + 0.01 * ((seed * 7 + a) % 3)
                m = fake_metrics(config, acc, 100 * spc + 10 * a + seed)
                write_json(m, path / "tune" / f"run_trial_{spc}_{a}_{seed}" / "run" / "metrics.json")
                rows.append({"arm": arm, "seed": seed, "samples_per_class": spc, "dropped": arm.lstrip("-"),
                             "config": json.dumps(config, sort_keys=True), "val_acc": acc, "test_acc": acc,
                             "test_ece": 0.08, "seconds": 12.5,
                             **{k: m[k] for k in ("label_il_train", "label_il_test", "feature_il_train",
                                                  "feature_il_test")}})
    pq.write_table(pa.Table.from_pylist(rows), path / "ablation.parquet")
    (path / "ablation.md").write_text("# Ablation of smile on digits (digits_cnn, 300 steps)\n\n"
                                      f"{seeds} seeds per arm. Reference: the full method.\n\n| table |\n")
    return path


def comparison_dir(path, seeds=3, methods=("l2", "mixup", "smile"), sizes=(3, 10), lrs=(None,)):
    """A comparison's folder; with several ``lrs``, a column per size and lr (as the
    paper's Fig. 1 file has a column per size and initialisation)."""
    rows = []
    cells = [(f"{s} per class" + (f", lr {lr}" if lr else ""), s, lr) for lr in lrs for s in sizes]
    columns = [c for c, _, _ in cells]
    for column, spc, lr in cells:
        for i, method in enumerate(methods):
            for seed in range(seeds):
                config = make_config({"method": method, "seed": seed, "samples_per_class": spc,
                                      **({"lr": lr} if lr else {})}).to_dict()
                acc = 0.55 + 0.02 * spc + 0.02 * i * (lr or 0.01) * 100 + 0.01 * ((seed * 5 + i) % 3)
                m = fake_metrics(config, acc, 1000 * spc + 10 * i + seed)
                write_json(m, path / "tune" / f"run_trial_{spc}_{i}_{seed}" / "run" / "metrics.json")
                rows.append({"method": method, "setting": column, "seed": seed,
                             "config": json.dumps(config, sort_keys=True), "val_acc": acc, "test_acc": acc,
                             "test_ece": 0.08, "seconds": 12.5, "label_il_train": m["label_il_train"],
                             "label_il_test": m["label_il_test"], "feature_il_train": m["feature_il_train"],
                             "feature_il_test": m["feature_il_test"]})
    pq.write_table(pa.Table.from_pylist(rows), path / "results.parquet")
    (path / "table.md").write_text("# Methods compared on digits (digits_cnn, weights=source, 300 steps)\n\n"
                                   f"{seeds} seeds per cell. Reference: l2. Cells: ...\n\n"
                                   "| method | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n")
    return path


def study_dir(path, trials=6):
    rows = []
    for t in range(trials):
        trial_id = f"a1b2c_{t:05d}"
        alpha = 0.1 * (t + 1)
        config = make_config({"mixup_alpha": alpha}).to_dict()
        acc = 0.7 + 0.02 * t - 0.004 * t * t
        m = fake_metrics(config, acc, t)
        write_json(m, path / "tune" / f"run_trial_{trial_id}_{t}_mixup_alpha={alpha:.4f}" / "run" / "metrics.json")
        rows.append({"trial_id": trial_id, "mixup_alpha": alpha, "val_acc": acc, "val_ece": 0.1, "test_acc": acc,
                     "test_ece": 0.08, "steps": STEPS, "seconds": 12.5, "status": "TERMINATED"})
    pq.write_table(pa.Table.from_pylist(rows), path / "trials.parquet")
    best = max(rows, key=lambda r: r["val_acc"])
    write_json({"trial_id": best["trial_id"], "metric": "val_acc", "mode": "max", "val_acc": best["val_acc"],
                "test_acc": best["test_acc"], "study": {"trials": trials},
                "config": make_config({"mixup_alpha": best["mixup_alpha"]}).to_dict()}, path / "best.json")
    return path


def images_of(report_path):
    """The images a report links, resolved against its folder; each must exist."""
    text = report_path.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    for link in links:
        assert not link.startswith("/"), link  # relative
        assert (report_path.parent / link).is_file(), link
    return links


def test_a_train_run(tmp_path):
    out = build_report([train_dir(tmp_path / "run")], tmp_path / "r" / "report.md")
    text = out.read_text()
    assert "## Run: smile on digits (digits_cnn, 300 steps, seed 2022)" in text
    assert "| test accuracy (%) | 80.00 |" in text and "Interpolation loss" in text
    links = images_of(out)
    assert [re.sub(r"^\d+-", "", link.split("/")[-1]) for link in links] == ["curves.png", "reliability.png"]
    assert all(link.startswith("report_files/") for link in links)


def test_an_ablation_with_two_data_sizes(tmp_path):
    out = build_report([ablation_dir(tmp_path / "abl", sizes=(3, 10))], tmp_path / "report.md")
    text = out.read_text()
    assert "## Ablation of smile on digits" in text and "MDE (80 %)" in text
    assert "IQM not shown: it needs at least 8 runs per cell, and the smallest cell here has 3." in text
    assert "| samples_per_class | arm | runs | Label-IL train |" in text
    names = [link.split("-", 1)[1] for link in images_of(out)]
    assert names == ["ablation.png", "size.png", "curves.png", "reliability.png"]


def test_an_ablation_with_eight_seeds_shows_the_iqm(tmp_path):
    text = build_report([ablation_dir(tmp_path / "abl", seeds=8)], tmp_path / "report.md").read_text()
    assert "IQM [95 % CI]" in text and "IQM not shown" not in text
    names = [link.split("-", 1)[1] for link in images_of(tmp_path / "report.md")]
    assert "size.png" not in names  # one data size: no accuracy-against-size plot


def test_a_comparison_over_data_sizes(tmp_path):
    out = build_report([comparison_dir(tmp_path / "cmp")], tmp_path / "report.md")
    text = out.read_text()
    assert "Reference: `l2`" in text and "| method | 3 per class | 10 per class |" in text
    smile = next(ln for ln in text.splitlines() if ln.startswith("| smile |"))
    assert smile.count("MDE") == 2
    names = [link.split("-", 1)[1] for link in images_of(out)]
    assert names == ["compare.png", "difference.png", "size.png", "curves.png", "reliability.png"]


def test_a_comparison_over_sizes_and_another_key_is_the_papers_figure_1(tmp_path):
    """Columns per size and lr: each method's paired difference to l2 against the size,
    a series per method and lr, each point the paired statistics of its seeds."""
    from smile_ray.orchestration.compare import analyses
    from smile_ray.reports.tables import size_differences
    from smile_ray.stats import paired_stats

    folder = comparison_dir(tmp_path / "cmp", methods=("l2", "mixup"), sizes=(3, 10), lrs=(0.01, 0.02))
    rows = pq.read_table(folder / "results.parquet").to_pylist()
    series = size_differences(rows, "l2")
    assert [(s["method"], s["group"], [p["size"] for p in s["points"]]) for s in series] == [
        ("mixup", "lr=0.01", [3, 10]), ("mixup", "lr=0.02", [3, 10])]
    acc = {(r["method"], r["setting"], r["seed"]): 100 * r["test_acc"] for r in rows}
    st = paired_stats([acc["l2", "10 per class, lr 0.02", k] for k in range(3)],
                      [acc["mixup", "10 per class, lr 0.02", k] for k in range(3)])
    point = series[1]["points"][1]
    assert point["n"] == 3 and (point["diff"], point["ci_low"], point["ci_high"]) == (
        pytest.approx(st["diff"]), pytest.approx(st["ci_low"]), pytest.approx(st["ci_high"]))
    assert size_differences([r for r in rows if r["setting"].startswith("3 ")], "l2") == []  # one size: none

    # compare's table.md sections: Table 4 per column and method, then the Fig. 1 numbers and picture
    text, files = analyses(rows, "l2", tmp_path, "digits")
    assert files == [tmp_path / "difference.png"] and files[0].stat().st_size > 5000
    il = text.split("## Interpolation losses (the paper's Table 4)")[1].split("\n## ")[0]
    assert sum(ln.startswith("| ") and "per class" in ln for ln in il.splitlines()) == 8
    fig1 = text.split("(the paper's Fig. 1)")[1]
    assert f"| mixup | lr=0.02 | 10 | 3 | {st['diff']:+.2f} | [{st['ci_low']:+.2f}, {st['ci_high']:+.2f}] |" in fig1

    out = build_report([folder], tmp_path / "report.md")
    names = [link.split("-", 1)[1] for link in images_of(out)]
    assert names[:2] == ["compare.png", "difference.png"] and "size.png" not in names  # two columns per size
    # a title names the base's weights only where no column sets its own
    from smile_ray.reports.tables import comparison_title
    base = {"dataset": "d", "backbone": "b", "weights": "imagenet", "steps": 3}
    assert comparison_title(base) == "Methods compared on d (b, weights=imagenet, 3 steps)"
    assert comparison_title(base, ["weights", "samples_per_class"]) == "Methods compared on d (b, 3 steps)"


def test_a_comparison_is_read_from_its_recorded_state_not_its_markdown(tmp_path):
    """The columns' order and the reference come from compare.json; table.md is not read
    (its wording may change), so a folder without it reads the same."""
    cmp = comparison_dir(tmp_path / "cmp")
    (cmp / "table.md").unlink()
    write_json({"columns": ["10 per class", "3 per class"], "reference": "mixup"}, cmp / "compare.json")
    text = build_report([cmp], tmp_path / "report.md").read_text()
    assert "## Methods compared on digits (digits_cnn, weights=source, 300 steps)" in text
    assert "Reference: `mixup`" in text and "| method | 10 per class | 3 per class |" in text


def test_a_study(tmp_path):
    out = build_report([study_dir(tmp_path / "study")], tmp_path / "report.md")
    text = out.read_text()
    assert "## Study: smile on digits (digits_cnn, 300 steps, seed 2022)" in text and "Best trial `a1b2c_00002`" in text
    names = [link.split("-", 1)[1] for link in images_of(out)]
    assert names == ["curves.png", "reliability.png"]


def test_every_kind_in_one_report_from_the_command_line(tmp_path, capfd):
    dirs = [train_dir(tmp_path / "run"), study_dir(tmp_path / "study"), ablation_dir(tmp_path / "abl"),
            comparison_dir(tmp_path / "cmp")]
    out = tmp_path / "out" / "all.md"
    code = main(["report", *map(str, dirs), "--output", str(out)])
    assert code == 0 and f"wrote {out}" in capfd.readouterr().out
    text = out.read_text()
    assert [ln for ln in text.splitlines() if ln.startswith("## ")] == [
        "## Run: smile on digits (digits_cnn, 300 steps, seed 2022)",
        "## Study: smile on digits (digits_cnn, 300 steps, seed 2022)",
        "## Ablation of smile on digits (digits_cnn, 300 steps)",
        "## Methods compared on digits (digits_cnn, weights=source, 300 steps)"]
    assert len(images_of(out)) == 2 + 2 + 3 + 5 and (tmp_path / "out" / "all_files").is_dir()


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capfd):
    good = train_dir(tmp_path / "run")
    (tmp_path / "empty").mkdir()
    broken = ablation_dir(tmp_path / "broken")
    (broken / "ablation.parquet").write_bytes(b"not parquet")
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "metrics.json").write_text('{"method": "smile", ')
    for dirs, expect in [
        ([good, tmp_path / "missing"], "no such directory"),
        ([tmp_path / "empty"], "is not a smile-ray output directory"),
        ([good, broken], "is not a readable parquet table"),
        ([torn], "is not readable JSON"),
    ]:
        out = tmp_path / "o" / "report.md"
        code = main(["report", *map(str, dirs), "--output", str(out)])
        lines = capfd.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], (dirs, lines)
        assert not (tmp_path / "o").exists()


def test_plots_draw_what_they_are_given(tmp_path):
    rel = fake_metrics(make_config().to_dict(), 0.8, 0)["reliability"]
    pooled = pool_reliability([rel, rel])
    assert pooled["count"] == [2 * c for c in rel["count"]] and pooled["accuracy"] == pytest.approx(
        [a if a is None else pytest.approx(a) for a in rel["accuracy"]])
    assert plot_reliability({"a": rel, "b": pooled}, tmp_path / "r.png", "two panels").stat().st_size > 5000
    histories = [fake_metrics(make_config().to_dict(), 0.8, s)["history"] for s in range(3)]
    assert plot_curves({"smile": histories, "l2": histories[:1]}, tmp_path / "c.png", "curves").stat().st_size > 5000
    rows = [{"method": m, "samples_per_class": s, "test_acc": 0.5 + 0.01 * s + 0.001 * k}
            for m in ("l2", "smile") for s in (3, 10, 30) for k in range(3)]
    rows.append({"method": "mixup", "samples_per_class": 3, "test_acc": 0.6})  # one run: a point, no band
    assert plot_accuracy_vs_size(rows, "method", tmp_path / "s.png", "size").stat().st_size > 5000
