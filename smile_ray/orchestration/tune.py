"""``smile-ray tune``: a Ray Tune study over the config, searched by HyperOpt, tracked in
MLflow.

Each trial is one core run (:mod:`smile_ray.orchestration.trainable`): in the trial's
process, or on Ray Train workers when the space's ``resources.workers`` > 1; either way
it reports every evaluation and its checkpoint to Tune. Tuning selects on the validation
metric; test accuracy is recorded per trial and never used for selection.

Outputs in the study directory: ``trials.parquet`` (a row per trial), ``best.json``
(the best trial's full config and metrics; usable as ``--config`` for ``train``),
``<metric>_vs_params.png``, ``study.json`` (what ``--resume`` needs) and Tune's own
experiment directory ``tune/`` (with ``--storage``: in ``<storage>/<output name>/tune``,
each trial's ``metrics.json`` coming home to ``tune/`` in the output directory).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
from ray.tune.search.hyperopt import HyperOptSearch

from smile_ray.checkpoint import check_writable, write_json
from smile_ray.config import make_config
from smile_ray.errors import SmileError
from smile_ray.methods import method_class
from smile_ray.orchestration import tracking
from smile_ray.orchestration.cluster import check_address, connect, user_error
from smile_ray.orchestration.progress import study_progress
from smile_ray.orchestration.runner import (EXPERIMENT_DIR, can_resume, check_cluster, closing_on_error, fail,
                                            file_digest, finish, run_trials, saved_file, storage_root)
from smile_ray.orchestration.storage import check_storage, join
from smile_ray.orchestration.spaces import Param, Study, load_study
from smile_ray.orchestration.trainable import SPREAD_KEYS
from smile_ray.pretrain import load_source
from smile_ray.reports.plots import plot_study

RESULT_KEYS = ("val_acc", "val_ece", "test_acc", "test_ece", "steps", "seconds")


def to_tune(p: Param) -> Any:
    """A Ray Tune search-space object for one parameter."""
    a = p.args
    return {
        "uniform": lambda: tune.uniform(a[0], a[1]),
        "loguniform": lambda: tune.loguniform(a[0], a[1]),
        "quniform": lambda: tune.quniform(a[0], a[1], a[2]),
        "randint": lambda: tune.randint(a[0], a[1]),
        "choice": lambda: tune.choice(list(a)),
        "grid": lambda: tune.grid_search(list(a)),
    }[p.kind]()


def _search_alg(study: Study, base: dict[str, Any]):
    if study.search == "hyperopt":
        # Start from the base config where it lies inside the space, so tuning can only
        # improve on it (on validation).
        start = {p.name: base[p.name] for p in study.space if p.contains(base[p.name])}
        points = [start] if len(start) == len(study.space) else None
        searcher = HyperOptSearch(
            metric=study.metric, mode=study.mode, points_to_evaluate=points,
            n_initial_points=max(2, min(10, study.num_samples // 3)), random_state_seed=study.seed,
        )
        return ConcurrencyLimiter(searcher, max_concurrent=study.max_concurrent)
    return BasicVariantGenerator(max_concurrent=study.max_concurrent, random_state=study.seed)


def _scheduler(study: Study):
    if study.scheduler == "asha":
        b = study.base
        return ASHAScheduler(time_attr="step", metric=study.metric, mode=study.mode, max_t=b.steps,
                             grace_period=min(b.eval_every, b.steps), reduction_factor=2)
    return None


def expected_trials(study: Study) -> int:
    n = study.num_samples
    for p in study.space:
        if p.kind == "grid":
            n *= len(p.args)
    return n


def run_study(
    space_file: str | Path,
    output_dir: str | Path,
    *,
    num_samples: int | None = None,
    overrides: dict[str, Any] | None = None,
    address: str | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    resume: bool = False,
    cache_dir: str | Path | None = None,
    verbose: int = 1,
    storage: str | None = None,
    root: str | None = None,
) -> dict[str, Any]:
    """Run (or ``resume``) a study; returns the best trial's record (best.json).

    ``storage`` (``--storage``) is where the trials keep their files when the cluster has
    several nodes; ``root`` names the study's storage folder outright (a study inside an
    ablation or comparison: their own storage's ``tuning/<name>``)."""
    out = Path(output_dir).resolve()
    state_file = out / "study.json"
    if resume:  # the study continues with the settings it was started with
        saved = json.loads(state_file.read_text()) if state_file.is_file() else {}
        if not saved or not can_resume(saved.get("storage_root") or out):
            raise SmileError(f"--resume: {out} holds no study to resume")
        space_file = saved_file(saved["space_file"], saved.get("space_sha256"), space_file, "--space", "search_spaces")
        num_samples, overrides = saved["num_samples"], saved["overrides"]
        tracking_uri, experiment = saved["tracking_uri"], saved["experiment"]
        storage, root = saved.get("storage"), saved.get("storage_root")
    elif (out / EXPERIMENT_DIR).exists():
        raise SmileError(f"{out} already holds a study; use --resume, or another --output")

    # Everything is validated before a single thing is created.
    study = load_study(space_file, overrides, num_samples)
    check_writable(out, given=output_dir)
    check_address(address)  # before the tracking store, which a sqlite URI creates
    if storage and not root:
        root = storage_root(out, storage)
        check_storage(storage, root, fresh=not resume)
    root = root or str(out)
    uri = tracking_uri or tracking.default_tracking_uri()
    client = tracking.connect(uri)
    experiment = experiment or f"smile-ray-{study.base.dataset}"
    connect(address)
    check_cluster(storage or (root if root != str(out) else None), study.resources, address)
    if study.base.weights == "source":
        load_source(study.base, cache_dir)  # pre-train once, before trials race for it

    out.mkdir(parents=True, exist_ok=True)
    exp_id = tracking.experiment_id(client, experiment, uri)
    if resume:
        parent_id = saved["parent_run_id"]
        client.update_run(parent_id, status="RUNNING")
    else:
        parent = client.create_run(exp_id, run_name=out.name, tags={"study": out.name, "kind": "study",
                                                                    "method": study.base.method,
                                                                    "dataset": study.base.dataset,
                                                                    **tracking.code_version()})
        parent_id = parent.info.run_id
        client.log_batch(parent_id, params=tracking.flat_params(
            {**study.summary(), **{f"base.{k}": v for k, v in study.base.to_dict().items()}}))
        write_json({"space_file": str(study.path.resolve()), "space_sha256": file_digest(study.path),
                    "num_samples": study.num_samples,
                    "overrides": overrides or {}, "tracking_uri": uri, "experiment": experiment,
                    "parent_run_id": parent_id, "address": address, "storage": storage, "storage_root": root,
                    "mlflow_ui": tracking.ui_link(uri, exp_id, parent_id)}, state_file)

    base = study.base.to_dict()
    logger = tracking.StudyLogger(uri, exp_id, parent_id, out.name, base)
    setup = {"base": base, "cache_dir": str(cache_dir) if cache_dir else None, "resources": study.resources,
             "replicates": study.replicates}
    started = time.perf_counter()
    earlier = json.loads(state_file.read_text()).get("wall_seconds", 0.0)  # of the parts before a resume
    try:
        results = run_trials(
            out, setup, {p.name: to_tune(p) for p in study.space}, logger, resume=resume,
            expected=expected_trials(study), root=root,
            table=study_progress(study.searched, study.metric, study.mode, expected_trials(study)) if verbose else None,
            tune_config=tune.TuneConfig(
                metric=study.metric, mode=study.mode, num_samples=study.num_samples,
                search_alg=_search_alg(study, base), scheduler=_scheduler(study),
                max_concurrent_trials=study.max_concurrent,
            ),
        )
    finally:
        wall = earlier + time.perf_counter() - started
        write_json({**json.loads(state_file.read_text()), "wall_seconds": wall}, state_file)

    with closing_on_error(logger):
        rows = _rows(results, study)
        if not any(r["status"] == "TERMINATED" and r.get(study.metric) is not None for r in rows):
            # a trial's own one-line error (e.g. a GPU where CUDA does not work) says it best
            causes = [c for c in map(user_error, results.errors) if c is not None]
            why = f": {causes[0]}" if causes else f"; see {join(root, EXPERIMENT_DIR)} for the trials' errors"
            raise fail(logger, f"no trial of {out} finished{why}")
        best = _best(rows, study)
        pq.write_table(pa.Table.from_pylist(rows), out / "trials.parquet")
        record = {
            "trial_id": best["trial_id"], "metric": study.metric, "mode": study.mode,
            **{k: best.get(k) for k in RESULT_KEYS},
            **({"replicates": _replicates(best, study)} if study.replicates > 1 else {}),
            "study": {**study.summary(), "trials": len(rows), "wall_seconds": wall,
                      "trial_seconds": sum(r.get("seconds") or 0.0 for r in rows)},
            "config": make_config({**base, **{p: best[p] for p in study.searched}}).to_dict(),
        }
        write_json(record, out / "best.json")
        plot = plot_study(rows, study, out / f"{study.metric}_vs_params.png")
        logger.log_best_model(best["trial_id"])  # the best trial's model/ as the parent's best_model/
        finish(logger, [Path(study.path), out / "trials.parquet", out / "best.json", plot], {
            f"best_{study.metric}": best[study.metric], "best_test_acc": best.get("test_acc") or float("nan"),
            "trials": len(rows)})
    return record


def _rows(results, study: Study) -> list[dict[str, Any]]:
    rows = []
    for res in results:
        m = res.metrics or {}
        cfg = res.config or {}
        trial_id = m.get("trial_id") or Path(res.path).name
        rows.append({
            "trial_id": str(trial_id),
            **{p: cfg.get(p) for p in study.searched},
            study.metric: m.get(study.metric),
            **{k: m.get(k) for k in RESULT_KEYS if k != study.metric},
            **({f"{k}_{s}": m.get(f"{k}_{s}") for k in SPREAD_KEYS if k in RESULT_KEYS
                for s in ["std"] + [f"r{i}" for i in range(study.replicates)]} if study.replicates > 1 else {}),
            # STOPPED: ended early by the scheduler (ASHA), so it has no test metrics
            "status": "ERROR" if res.error else ("TERMINATED" if "test_acc" in m else "STOPPED"),
        })
    return sorted(rows, key=lambda r: r["trial_id"])


def _replicates(best: dict[str, Any], study: Study) -> dict[str, Any]:
    """The chosen trial's seeds with each one's value, mean and spread (best.json)."""
    keys = [k for k in SPREAD_KEYS if k in RESULT_KEYS]
    return {"seeds": study.replicate_seeds,
            **{k: {"per_seed": [best.get(f"{k}_r{i}") for i in range(study.replicates)],
                   "mean": best.get(k), "std": best.get(f"{k}_std")} for k in keys}}


def _best(rows: list[dict[str, Any]], study: Study) -> dict[str, Any]:
    done = [r for r in rows if r["status"] == "TERMINATED" and r.get(study.metric) is not None]
    sign = 1 if study.mode == "max" else -1
    # Ties on the metric go to the earliest trial id (deterministic).
    return max(done, key=lambda r: (sign * r[study.metric], [-ord(c) for c in r["trial_id"]]))


def tune_config(config: dict[str, Any], space: dict[str, Any], budget: int, folder: Path, resources,
                max_concurrent: int, *, tracking_uri: str, experiment: str, cache_dir, address,
                root: str | None = None) -> dict[str, Any]:
    """``config`` with the best of ``budget`` HyperOpt trials (on validation) over the
    keys of ``space`` its method reads; the study goes to ``folder``, its trials to
    ``root`` (default: ``folder``) (how ``ablate`` and ``compare`` tune each arm or
    method before its seeds run)."""
    unused = method_class(config["method"]).unused_keys(make_config(config))
    space = {k: v for k, v in space.items() if k not in unused}
    if not space:
        return config
    folder.mkdir(parents=True, exist_ok=True)
    space_file = folder.parent / f"{folder.name}.yaml"
    space_file.write_text(yaml.safe_dump({"base": config, "metric": "val_acc", "num_samples": budget,
                                          "max_concurrent": max_concurrent, "space": space,
                                          "resources": {"cpus": resources.cpus, "gpus": resources.gpus,
                                                        "workers": resources.workers}}))
    best = run_study(space_file, folder, tracking_uri=tracking_uri, experiment=experiment, cache_dir=cache_dir,
                     address=address, verbose=0, root=root)
    return {**config, **{k: best["config"][k] for k in space}}
