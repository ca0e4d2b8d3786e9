"""``smile-ray compare``: methods side by side over shared seeds, the paper's Table 2 form.

Every (method, column, seed) is one Ray Tune trial (:mod:`smile_ray.orchestration.trainable`)
on the settings file's ``resources``; the seeds are shared, so every method sees the same
data subsets, initialisations and draws, and differences are paired. With
``--tune-budget T`` each method first gets T HyperOpt trials on the validation split of
each column, over its own knobs (the settings file's ``tune_space``), and then runs its
seeds with its best config: every method gets the same search budget.

Outputs: ``results.parquet`` (a row per run), ``table.md`` (rows = methods, columns =
settings, mean ± std test accuracy, the best per column in bold, and each method's
paired difference to the reference method with its 95 % interval and minimum detectable
effect, and the IQM where a cell has 8 runs; then the interpolation losses per column and
method, the paper's Table 4; and where the columns span training-set sizes, each
method's paired difference to the reference against the size, the paper's Fig. 1, drawn
as ``difference.png``), ``table.png`` (the table as dots and intervals), an MLflow
parent run with a child per run. A run that
fails is named on one line and left out of the table; the others are kept. ``--resume``
continues an interrupted comparison (finished runs are kept).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from ray import tune

from smile_ray.config import make_config
from smile_ray.errors import SmileError
from smile_ray.metrics import IL_METRICS
from smile_ray.orchestration.progress import runs_progress
from smile_ray.orchestration.spaces import check_tune_budget, load_settings
from smile_ray.orchestration.storage import join
from smile_ray.orchestration.study import StudyRun, file_digest, saved_file
from smile_ray.orchestration.tune import tune_config
from smile_ray.registry import METHODS
from smile_ray.reports.plots import plot_compare, plot_difference_vs_size
from smile_ray.reports.tables import (COMPARE_LEGEND, compare_table, comparison_runs, comparison_title, il_table,
                                      reference_method, size_difference_table, size_differences)

STATE_FILE = "compare.json"


def parse_methods(text: str) -> list[str]:
    """``--methods l2,mixup,smile`` -> the names; an empty name (``l2,``, ``l2,,smile``) is
    refused: it is a typo more often than a wish to compare one method."""
    methods = [m.strip() for m in text.split(",")]
    if not any(methods):
        raise SmileError("--methods: give a comma-separated list, e.g. l2,mixup,smile")
    if not all(methods):
        raise SmileError(f"--methods {text!r}: an empty method name between commas; e.g. l2,mixup,smile")
    for m in methods:
        METHODS.check(m)
    dupes = sorted({m for m in methods if methods.count(m) > 1})
    if dupes:
        raise SmileError(f"--methods: {', '.join(dupes)} given twice")
    return methods


def analyses(rows: list[dict[str, Any]], reference: str, out: Path, title: str) -> tuple[str, list[Path]]:
    """table.md's sections after the table, and the files they draw: the interpolation
    losses per column and method (the paper's Table 4), and, where the columns span
    training-set sizes, each method's paired difference to ``reference`` against the
    size (the paper's Fig. 1, ``difference.png``)."""
    text, files = "", []
    il = il_table(rows, ["setting", "method"])
    if il:
        text += ("\n## Interpolation losses (the paper's Table 4)\n\nMean ± std over seeds of Label-IL and "
                 "Feature-IL (paper, Eq. 1) on training and test images; docs/method.md.\n\n" + il)
    series = size_differences(rows, reference)
    if series:
        files.append(plot_difference_vs_size(series, reference, out / "difference.png",
                                             f"Paired difference to {reference} against data size: {title}"))
        text += (f"\n## Difference to {reference} against training-set size (the paper's Fig. 1)\n\n"
                 "![difference to the reference against size](difference.png)\n\n"
                 + size_difference_table(series, reference))
    return text, files


def column_configs(settings) -> list:
    """The base with each column's overrides: what a column's runs train from (a column
    may set its own ``weights``, so the base alone need not name usable ones)."""
    return [make_config({**settings.base.to_dict(), **col}) for col in settings.columns.values()]


def run_compare(methods: list[str], settings_file: str | Path, output_dir: str | Path, *, seeds: int | None = None,
                overrides: dict[str, Any] | None = None, tune_budget: int = 0, on_failed=None,
                **options: Any) -> str:
    """Run (or ``resume``) the comparison; returns the Markdown table (also in table.md).
    ``on_failed(line)`` is called once per failed run. ``options`` are
    :class:`~smile_ray.orchestration.study.StudyRun`'s (``resume``, ``address``,
    ``tracking_uri``, ``experiment``, ``cache_dir``, ``storage``, ``verbose``)."""
    run = StudyRun(output_dir, kind="comparison", state_name=STATE_FILE, holds=(STATE_FILE, "results.parquet"),
                   **options)
    if run.resume:
        saved = run.saved
        settings_file = saved_file(saved["settings"], saved.get("settings_sha256"), None, "--settings", "compare")
        methods, seeds = saved["methods"], saved["seeds"]
        overrides, tune_budget = saved["overrides"], saved["tune_budget"]

    # Everything is validated before a single thing is created.
    settings = load_settings(settings_file, methods, overrides or {}, seeds)
    check_tune_budget(tune_budget, any(m in settings.tune_space for m in methods),
                      f"a tune_space for the methods in {settings.path}")
    run.start(settings.base, settings.resources, sources=column_configs(settings))
    out = run.out
    columns = list(settings.columns)
    reference = reference_method(methods)

    if run.resume:
        runs = run.saved["runs"]
    else:
        base = settings.base.to_dict()
        cell_configs = {
            (m, column): tune_config(run, f"{m}-{column}".replace("/", "_").replace("=", "_"),
                                     make_config({**base, **col_overrides, "method": m}).to_dict(),
                                     settings.tune_space.get(m) or {}, tune_budget, settings.resources,
                                     settings.max_concurrent)
            for column, col_overrides in settings.columns.items() for m in methods}
        runs = [
            {"tags": {"method": m, "setting": column, "seed": seed},
             "config": make_config({**cell_configs[m, column], "seed": seed}).to_dict()}
            for column in columns for m in methods for seed in range(settings.seeds)
        ]
    run.open_parent({}, {"methods": ",".join(methods), "settings": ",".join(columns), "seeds": settings.seeds,
                         "tune_budget": tune_budget, **settings.resources.summary(),
                         **{f"base.{k}": v for k, v in settings.base.to_dict().items()}})
    run.save({"methods": methods, "settings": str(Path(settings.path).resolve()),
              "settings_sha256": file_digest(settings.path), "seeds": settings.seeds, "overrides": overrides or {},
              "tune_budget": tune_budget, "runs": runs, "columns": columns, "reference": reference})

    started = time.perf_counter()
    results = run.trials(run.setup(settings.resources, runs=runs), {"run": tune.grid_search(list(range(len(runs))))},
                         expected=len(runs),
                         table=runs_progress(runs, ["method", "setting", "seed"], len(runs)) if run.verbose else None,
                         tune_config=tune.TuneConfig(max_concurrent_trials=settings.max_concurrent))

    with run.closing():
        rows, failed = [], []
        searched = sorted({k for space in settings.tune_space.values() for k in space}) if tune_budget else []
        for res in results:
            spec = runs[res.config["run"]]
            m = res.metrics or {}
            if res.error or "test_acc" not in m:
                tags = spec["tags"]
                line = (f"run failed: {tags['method']} {tags['setting']} seed {tags['seed']}: "
                        f"{str(res.error).strip().splitlines()[-1] if res.error else 'no test metrics'} (see {res.path})")
                failed.append(line)
                if on_failed is not None:
                    on_failed(line)
                continue
            rows.append({**spec["tags"], **{k: spec["config"].get(k) for k in searched},
                         "config": json.dumps(spec["config"], sort_keys=True),
                         "val_acc": m["val_acc"], "test_acc": m["test_acc"], "test_ece": m["test_ece"],
                         "seconds": m["seconds"], **{k: m.get(k) for k in IL_METRICS}})
        if not rows:
            raise run.fail(f"every run of {out} failed; see {join(run.root, 'tune')}")
        order = {(t["method"], t["setting"], t["seed"]): i for i, t in enumerate(r["tags"] for r in runs)}
        rows.sort(key=lambda r: order[r["method"], r["setting"], r["seed"]])
        pq.write_table(pa.Table.from_pylist(rows), out / "results.parquet")
        table = compare_table(rows, methods, columns, reference)
        b = settings.base
        varied = {k for col in settings.columns.values() for k in col}
        run_desc = comparison_runs(b.to_dict(), varied)
        header = (f"# {comparison_title(b.to_dict(), varied)}\n\n"
                  f"{settings.seeds} seeds per cell, {len(runs)} runs ({len(failed)} failed), "
                  f"{time.perf_counter() - started:.0f} s"
                  f"{f', each method tuned with {tune_budget} trials per column' if tune_budget else ', reference settings'}. "
                  f"Reference: {reference}. {COMPARE_LEGEND}\n\n")
        title = f"{b.dataset} ({run_desc}, {settings.seeds} seeds)"
        extra, files = analyses(rows, reference, out, title)
        (out / "table.md").write_text(header + table + "".join(f"\n{line}" for line in failed) + extra)
        plot = plot_compare(rows, methods, columns, out / "table.png", f"Test accuracy on {title}")
        run.finish([out / "results.parquet", out / "table.md", plot, *files, Path(settings.path)])
    return table
