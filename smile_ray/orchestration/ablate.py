"""``smile-ray ablate``: component ablations over shared seeds, with paired statistics.

Arms: the full method, and one arm per ``--drop`` (``a+b`` drops several components in
one arm; ``--all`` is leave-one-component-out). Every arm runs on the same seeds (same
data subsets, initialisations and draws) and, optionally, several ``samples_per_class``
values; all runs are Ray Tune trials (:mod:`smile_ray.orchestration.trainable`) with the
definitions' ``resources`` (Ray Train workers and GPUs included), each tracked as a
nested MLflow run. With ``--tune-budget T`` each arm first gets its own HyperOpt search
of T trials on the validation split over the parameters it still uses (as its method
declares), then runs its seeds with its own best config, so a component is not judged
on hyper-parameters tuned for the full method.

``--resume`` continues an interrupted ablation in its output directory: finished runs
are kept, the rest run, and the same MLflow parent run collects them.

Statistics: :mod:`smile_ray.stats`; tables and plots: :mod:`smile_ray.reports`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from ray import tune

from smile_ray.checkpoint import write_json
from smile_ray.config import make_config
from smile_ray.errors import SmileError
from smile_ray.metrics import IL_METRICS
from smile_ray.orchestration import tracking
from smile_ray.orchestration.cluster import check_address, connect
from smile_ray.orchestration.progress import ablation_progress
from smile_ray.orchestration.runner import can_resume, finish, run_trials
from smile_ray.orchestration.spaces import Definitions, load_definitions
from smile_ray.orchestration.tune import tune_config
from smile_ray.pretrain import load_source
from smile_ray.reports.plots import plot_ablation
from smile_ray.reports.tables import ABLATION_LEGEND, ablation_table

FULL = "full"
STATE_FILE = "ablation.json"


def build_arms(defs: Definitions, drops: list[str], all_components: bool) -> dict[str, dict[str, Any]]:
    """Arm name -> config overrides; the full method first."""
    valid = list(defs.components)
    specs = [[c] for c in valid] if all_components else [d.split("+") for d in drops]
    if not specs:
        raise SmileError("nothing to ablate: give --drop COMPONENT (repeatable, a+b for several) or --all")
    arms: dict[str, dict[str, Any]] = {FULL: {}}
    for spec in specs:
        for c in spec:
            if c not in defs.components:
                raise SmileError(f"unknown component {c!r} (valid: {', '.join(valid)})")
        if set(spec) == set(valid):
            raise SmileError(f"dropping every component ({'+'.join(spec)}) leaves an empty method")
        overrides: dict[str, Any] = {}
        for c in spec:
            overrides.update(defs.components[c])
        arms["-" + "+".join(spec)] = overrides
    return arms


def run_ablation(
    definitions: str | Path,
    output_dir: str | Path,
    *,
    drops: list[str] = (),
    all_components: bool = False,
    seeds: int | None = None,
    base_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    tune_budget: int = 0,
    address: str | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    cache_dir: str | Path | None = None,
    resume: bool = False,
    verbose: int = 1,
) -> str:
    """Run (or ``resume``) the ablation; returns the Markdown table (also in ``ablation.md``)."""
    out = Path(output_dir).resolve()
    if resume:
        if not (out / STATE_FILE).is_file() or not can_resume(out):
            raise SmileError(f"--resume: {out} holds no ablation to resume")
        saved = json.loads((out / STATE_FILE).read_text())
        definitions, drops, all_components = saved["definitions"], saved["drops"], saved["all_components"]
        seeds, base_file, overrides = saved["seeds"], saved["base_file"], saved["overrides"]
        tune_budget, tracking_uri, experiment = saved["tune_budget"], saved["tracking_uri"], saved["experiment"]
    elif (out / STATE_FILE).exists() or (out / "ablation.parquet").exists():
        raise SmileError(f"{out} already holds an ablation; use --resume, or another --output")

    # Everything is validated before a single thing is created.
    defs = load_definitions(definitions, base_file, overrides or {}, seeds)
    arms = build_arms(defs, list(drops), all_components)
    if tune_budget < 0:
        raise SmileError(f"--tune-budget={tune_budget} must be >= 0")
    if tune_budget and not defs.tune_space:
        raise SmileError(f"--tune-budget needs a tune_space in {defs.path}")
    check_address(address)  # before the tracking store, which a sqlite URI creates
    uri = tracking_uri or tracking.default_tracking_uri()
    client = tracking.connect(uri)
    experiment = experiment or f"smile-ray-{defs.base.dataset}"
    connect(address)
    load_source(defs.base, cache_dir)
    out.mkdir(parents=True, exist_ok=True)

    exp_id = tracking.experiment_id(client, experiment, uri)
    if resume:
        runs, parent_id = saved["runs"], saved["parent_run_id"]
        client.update_run(parent_id, status="RUNNING")
    else:
        base = defs.base.to_dict()
        arm_configs = {}
        for arm, arm_overrides in arms.items():
            config = {**base, **arm_overrides}
            if tune_budget:
                config = tune_config(config, defs.tune_space, tune_budget,
                                     out / "tuning" / arm.lstrip("-").replace("+", "_"), defs.resources,
                                     defs.max_concurrent, tracking_uri=uri, experiment=experiment,
                                     cache_dir=cache_dir, address=address)
            arm_configs[arm] = config
        runs = [
            {"tags": {"arm": arm, "seed": seed, "samples_per_class": spc},
             "config": make_config({**arm_configs[arm], "seed": seed, "samples_per_class": spc}).to_dict()}
            for spc in defs.samples for arm in arms for seed in range(defs.seeds)
        ]
        parent_id = client.create_run(exp_id, run_name=out.name, tags={"study": out.name, "kind": "ablation"}).info.run_id
        client.log_batch(parent_id, params=tracking.flat_params(
            {"arms": ",".join(arms), "seeds": defs.seeds, "samples_per_class": ",".join(map(str, defs.samples)),
             "tune_budget": tune_budget, **defs.resources.summary(), **{f"base.{k}": v for k, v in base.items()}}))
        write_json({"definitions": str(Path(definitions).resolve()), "drops": list(drops),
                    "all_components": all_components, "seeds": defs.seeds,
                    "base_file": str(Path(base_file).resolve()) if base_file else None, "overrides": overrides or {},
                    "tune_budget": tune_budget, "tracking_uri": uri, "experiment": experiment,
                    "parent_run_id": parent_id, "mlflow_ui": tracking.ui_link(uri, exp_id, parent_id),
                    "runs": runs}, out / STATE_FILE)

    logger = tracking.StudyLogger(uri, exp_id, parent_id, out.name, defs.base.to_dict(), runs=runs)
    setup = {"runs": runs, "cache_dir": str(cache_dir) if cache_dir else None, "resources": defs.resources}
    started = time.perf_counter()
    results = run_trials(out, setup, {"run": tune.grid_search(list(range(len(runs))))}, logger, resume=resume,
                         expected=len(runs), table=ablation_progress(runs, len(runs)) if verbose else None,
                         tune_config=tune.TuneConfig(max_concurrent_trials=defs.max_concurrent))
    if results.num_errors:
        logger.close_open_runs("FAILED")
        client.set_terminated(parent_id, status="FAILED")
        raise SmileError(f"{results.num_errors} ablation runs failed; see {out / 'tune'}; fix the cause and add --resume")

    rows = []
    for res in results:
        spec = runs[res.config["run"]]
        m = res.metrics
        rows.append({**spec["tags"], "dropped": spec["tags"]["arm"].lstrip("-") if spec["tags"]["arm"] != FULL else "",
                     "config": json.dumps(spec["config"], sort_keys=True),
                     "val_acc": m["val_acc"], "test_acc": m["test_acc"], "test_ece": m["test_ece"],
                     "seconds": m["seconds"], **{k: m.get(k) for k in IL_METRICS}})
    arm_names = list(dict.fromkeys(r["tags"]["arm"] for r in runs))
    rows.sort(key=lambda r: (r["samples_per_class"], arm_names.index(r["arm"]), r["seed"]))
    pq.write_table(pa.Table.from_pylist(rows), out / "ablation.parquet")
    table = ablation_table(rows, arm_names, FULL)
    b = defs.base
    what = f"{b.method} on {b.dataset} ({b.backbone}, {b.steps} steps)"
    header = (f"# Ablation of {what}\n\n"
              f"{defs.seeds} seeds per arm, {len(runs)} runs, {time.perf_counter() - started:.0f} s"
              f"{f', each arm tuned with {tune_budget} trials' if tune_budget else ''}. "
              f"Reference: the full method. {ABLATION_LEGEND}\n\n")
    (out / "ablation.md").write_text(header + table)
    plot = plot_ablation(rows, arm_names, out / "ablation.png", f"Ablation of {what}: test accuracy per arm")
    finish(logger, [out / "ablation.parquet", out / "ablation.md", plot, defs.path])
    return table

