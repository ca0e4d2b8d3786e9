"""``smile-ray compare``: methods side by side over shared seeds, the paper's Table 2 form.

Every (method, column, seed) is one Ray Tune trial (:mod:`smile_ray.orchestration.trainable`)
on the settings file's ``resources``; the seeds are shared, so every method sees the same
data subsets, initialisations and draws, and differences are paired. With
``--tune-budget T`` each method first gets T HyperOpt trials on the validation split of
each column, over its own knobs (the settings file's ``tune_spaces``), and then runs its
seeds with its best config: every method gets the same search budget.

Outputs: ``results.parquet`` (a row per run), ``table.md`` (rows = methods, columns =
settings, mean ± std test accuracy, the best per column in bold, and each method's
paired difference to the reference method with its 95 % interval and minimum detectable
effect, and the IQM where a cell has 8 runs), ``table.png`` (the
same as dots and intervals), an MLflow parent run with a child per run. A run that
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

from smile_ray.checkpoint import check_writable, write_json
from smile_ray.config import make_config
from smile_ray.errors import SmileError
from smile_ray.metrics import IL_METRICS
from smile_ray.orchestration import tracking
from smile_ray.orchestration.cluster import check_address, connect
from smile_ray.orchestration.progress import runs_progress
from smile_ray.orchestration.runner import (can_resume, check_cluster, closing_on_error, file_digest, finish, run_trials,
                                            saved_file, storage_root)
from smile_ray.orchestration.storage import check_storage, join
from smile_ray.orchestration.spaces import load_settings
from smile_ray.orchestration.tune import tune_config
from smile_ray.pretrain import load_source
from smile_ray.registry import METHODS
from smile_ray.reports.plots import plot_compare
from smile_ray.reports.tables import COMPARE_LEGEND, compare_table

STATE_FILE = "compare.json"
REFERENCE = "l2"


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


def run_compare(
    methods: list[str],
    settings_file: str | Path,
    output_dir: str | Path,
    *,
    seeds: int | None = None,
    overrides: dict[str, Any] | None = None,
    tune_budget: int = 0,
    address: str | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    cache_dir: str | Path | None = None,
    resume: bool = False,
    verbose: int = 1,
    on_failed=None,
    storage: str | None = None,
) -> str:
    """Run (or ``resume``) the comparison; returns the Markdown table (also in table.md).
    ``on_failed(line)`` is called once per failed run. ``storage``: where the runs keep
    their files on a cluster of several nodes."""
    out = Path(output_dir).resolve()
    if resume:
        saved = json.loads((out / STATE_FILE).read_text()) if (out / STATE_FILE).is_file() else {}
        if not saved or not can_resume(saved.get("storage_root") or out):
            raise SmileError(f"--resume: {out} holds no comparison to resume")
        storage = saved.get("storage")
        settings_file = saved_file(saved["settings"], saved.get("settings_sha256"), None, "--settings", "compare")
        methods, seeds = saved["methods"], saved["seeds"]
        overrides, tune_budget = saved["overrides"], saved["tune_budget"]
        tracking_uri, experiment = saved["tracking_uri"], saved["experiment"]
    elif (out / STATE_FILE).exists() or (out / "results.parquet").exists():
        raise SmileError(f"{out} already holds a comparison; use --resume, or another --output")

    # Everything is validated before a single thing is created.
    settings = load_settings(settings_file, methods, overrides or {}, seeds)
    if tune_budget < 0:
        raise SmileError(f"--tune-budget={tune_budget} must be >= 0")
    if tune_budget and not any(m in settings.tune_spaces for m in methods):
        raise SmileError(f"--tune-budget needs tune_spaces for the methods in {settings.path}")
    check_writable(out, given=output_dir)
    check_address(address)  # before the tracking store, which a sqlite URI creates
    root = storage_root(out, storage)
    if storage:
        check_storage(storage, root, fresh=not resume)
    uri = tracking_uri or tracking.default_tracking_uri()
    client = tracking.connect(uri)
    experiment = experiment or f"smile-ray-{settings.base.dataset}"
    connect(address)
    check_cluster(storage, settings.resources, address)
    load_source(settings.base, cache_dir)
    out.mkdir(parents=True, exist_ok=True)

    exp_id = tracking.experiment_id(client, experiment, uri)
    if resume:
        runs, parent_id = saved["runs"], saved["parent_run_id"]
        client.update_run(parent_id, status="RUNNING")
    else:
        base = settings.base.to_dict()
        cell_configs = {}
        for column, col_overrides in settings.columns.items():
            for m in methods:
                config = make_config({**base, **col_overrides, "method": m}).to_dict()
                if tune_budget:
                    name = f"{m}-{column}".replace("/", "_").replace("=", "_")
                    config = tune_config(config, settings.tune_spaces.get(m) or {}, tune_budget, out / "tuning" / name,
                                         settings.resources, settings.max_concurrent, tracking_uri=uri,
                                         experiment=experiment, cache_dir=cache_dir, address=address,
                                         root=join(root, "tuning", name) if storage else None)
                cell_configs[m, column] = config
        runs = [
            {"tags": {"method": m, "setting": column, "seed": seed},
             "config": make_config({**cell_configs[m, column], "seed": seed}).to_dict()}
            for column in settings.columns for m in methods for seed in range(settings.seeds)
        ]
        parent_id = client.create_run(exp_id, run_name=out.name, tags={"study": out.name, "kind": "comparison",
                                                                       **tracking.code_version()}).info.run_id
        client.log_batch(parent_id, params=tracking.flat_params(
            {"methods": ",".join(methods), "settings": ",".join(settings.columns), "seeds": settings.seeds,
             "tune_budget": tune_budget, **settings.resources.summary(), **{f"base.{k}": v for k, v in base.items()}}))
        write_json({"methods": methods, "settings": str(Path(settings.path).resolve()),
                    "settings_sha256": file_digest(settings.path), "seeds": settings.seeds,
                    "overrides": overrides or {}, "tune_budget": tune_budget, "tracking_uri": uri,
                    "experiment": experiment, "parent_run_id": parent_id,
                    "mlflow_ui": tracking.ui_link(uri, exp_id, parent_id), "runs": runs, "storage": storage,
                    "storage_root": root}, out / STATE_FILE)

    logger = tracking.StudyLogger(uri, exp_id, parent_id, out.name, settings.base.to_dict(), runs=runs)
    setup = {"runs": runs, "cache_dir": str(cache_dir) if cache_dir else None, "resources": settings.resources}
    started = time.perf_counter()
    results = run_trials(out, setup, {"run": tune.grid_search(list(range(len(runs))))}, logger, resume=resume,
                         expected=len(runs), root=root,
                         table=runs_progress(runs, ["method", "setting", "seed"], len(runs)) if verbose else None,
                         tune_config=tune.TuneConfig(max_concurrent_trials=settings.max_concurrent))

    with closing_on_error(logger):
        rows, failed = [], []
        searched = sorted({k for space in settings.tune_spaces.values() for k in space}) if tune_budget else []
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
            logger.close_open_runs("FAILED")
            client.set_terminated(parent_id, status="FAILED")
            raise SmileError(f"every run of {out} failed; see {join(root, 'tune')}")
        order = {(t["method"], t["setting"], t["seed"]): i for i, t in enumerate(r["tags"] for r in runs)}
        rows.sort(key=lambda r: order[r["method"], r["setting"], r["seed"]])
        pq.write_table(pa.Table.from_pylist(rows), out / "results.parquet")
        reference = REFERENCE if REFERENCE in methods else methods[0]
        table = compare_table(rows, methods, list(settings.columns), reference)
        b = settings.base
        run_desc = f"{b.backbone}, weights={b.weights}, {b.steps} steps"
        what = f"{b.dataset} ({run_desc})"
        header = (f"# Methods compared on {what}\n\n"
                  f"{settings.seeds} seeds per cell, {len(runs)} runs ({len(failed)} failed), "
                  f"{time.perf_counter() - started:.0f} s"
                  f"{f', each method tuned with {tune_budget} trials per column' if tune_budget else ', reference settings'}. "
                  f"Reference: {reference}. {COMPARE_LEGEND}\n\n")
        (out / "table.md").write_text(header + table + "".join(f"\n{line}" for line in failed))
        plot = plot_compare(rows, methods, list(settings.columns), out / "table.png",
                            f"Test accuracy on {b.dataset} ({run_desc}, {settings.seeds} seeds)")
        finish(logger, [out / "results.parquet", out / "table.md", plot, Path(settings.path)])
    return table

