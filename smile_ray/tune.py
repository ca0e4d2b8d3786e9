"""``smile-ray tune``: a Ray Tune study over the config, searched by HyperOpt, tracked in
MLflow (orchestration layer).

Each trial is one call of the core :func:`smile_ray.train.train` in the trial's process
(or a :class:`ray.train.torch.TorchTrainer` when the space asks for ``workers`` > 1),
reporting every evaluation and its checkpoint to Tune. Tuning selects on the validation
metric; test accuracy is recorded per trial and never used for selection.

Outputs in the study directory: ``trials.parquet`` (a row per trial), ``best.json``
(the best trial's full config and metrics; usable as ``--config`` for ``train``),
``<metric>_vs_params.png``, ``study.json`` (what ``--resume`` needs) and Tune's own
experiment directory ``tune/``.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
from ray.tune.search.hyperopt import HyperOptSearch

from smile_ray import tracking
from smile_ray.config import make_config
from smile_ray.distributed import connect, train_distributed
from smile_ray.errors import SmileError
from smile_ray.pretrain import load_source
from smile_ray.study import Param, Study, load_study
from smile_ray.train import atomic_write_json, train

EXPERIMENT_DIR = "tune"
TRIAL_DRIVER_CPU = 0.01  # a trial that launches a TorchTrainer holds (almost) no CPU itself


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


def trial(params: dict[str, Any], setup: dict[str, Any]) -> None:
    """The Tune trainable: the study's base config with this trial's parameters, or, in
    an ablation, the full config of run number ``params["run"]``."""
    values = setup["runs"][params["run"]]["config"] if "run" in params else {**setup["base"], **params}
    config = make_config(values)

    def report(metrics: dict[str, Any], checkpoint_dir: str) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))

    checkpoint = tune.get_checkpoint()
    if setup["workers"] > 1:
        # A TorchTrainer per trial; its result comes back as this trial's final report.
        out = Path(tune.get_context().get_trial_dir()) / "train"
        m = train_distributed(config, out, workers=setup["workers"], use_gpu=setup["gpus"] > 0,
                              cpus_per_worker=(setup["cpus"] - TRIAL_DRIVER_CPU) / setup["workers"],
                              cache_dir=setup["cache_dir"], storage_path=str(out / "ray"))
        final = {k: v for k, v in m.items() if not isinstance(v, (dict, list))}
        tune.report({**m["history"][-1], **final, "done": True}, checkpoint=tune.Checkpoint.from_directory(out / "checkpoint"))
        return
    if checkpoint:
        with checkpoint.as_directory() as d:
            train(config, None, cache_dir=setup["cache_dir"], resume_from=d, report=report, log=lambda m: None)
    else:
        train(config, None, cache_dir=setup["cache_dir"], report=report, log=lambda m: None)


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
) -> dict[str, Any]:
    """Run (or ``resume``) a study; returns the best trial's record (best.json)."""
    out = Path(output_dir).resolve()
    state_file = out / "study.json"
    if resume:
        if not state_file.is_file() or not tune.Tuner.can_restore(str(out / EXPERIMENT_DIR)):
            raise SmileError(f"--resume: {out} holds no study to resume")
        saved = json.loads(state_file.read_text())
        space_file, num_samples, overrides = saved["space_file"], saved["num_samples"], saved["overrides"]
        tracking_uri, experiment = saved["tracking_uri"], saved["experiment"]
    elif (out / EXPERIMENT_DIR).exists():
        raise SmileError(f"{out} already holds a study; use --resume, or another --output")

    # Everything is validated before a single thing is created.
    study = load_study(space_file, overrides, num_samples)
    uri = tracking_uri or tracking.default_tracking_uri()
    client = tracking.connect(uri)
    experiment = experiment or f"smile-ray-{study.base.dataset}"
    connect(address)
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
                                                                    "dataset": study.base.dataset})
        parent_id = parent.info.run_id
        client.log_batch(parent_id, params=tracking.flat_params(
            {**study.summary(), **{f"base.{k}": v for k, v in study.base.to_dict().items()}}))
        atomic_write_json({"space_file": str(Path(space_file).resolve()), "num_samples": study.num_samples,
                           "overrides": overrides or {}, "tracking_uri": uri, "experiment": experiment,
                           "parent_run_id": parent_id, "address": address}, state_file)

    base = study.base.to_dict()
    logger = tracking.StudyLogger(uri, exp_id, parent_id, out.name, base)
    setup = {"base": base, "cache_dir": str(cache_dir) if cache_dir else None,
             "workers": study.resources["workers"], "gpus": study.resources["gpus"], "cpus": study.resources["cpus"]}
    param_space = {p.name: to_tune(p) for p in study.space}
    trainable = _trainable(study, setup)
    started = time.perf_counter()
    try:
        if resume:
            tuner = tune.Tuner.restore(str(out / EXPERIMENT_DIR), trainable, resume_errored=True, param_space=param_space)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(
                    metric=study.metric, mode=study.mode, num_samples=study.num_samples,
                    search_alg=_search_alg(study, base), scheduler=_scheduler(study),
                    max_concurrent_trials=study.max_concurrent,
                ),
                run_config=tune.RunConfig(
                    name=EXPERIMENT_DIR, storage_path=str(out), callbacks=[logger], verbose=verbose,
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                    failure_config=tune.FailureConfig(max_failures=1),
                ),
            )
        results = tuner.fit()
    except KeyboardInterrupt:
        logger.close_open_runs("KILLED")
        client.set_terminated(parent_id, status="KILLED")
        raise
    except BaseException:
        logger.close_open_runs("FAILED")
        client.set_terminated(parent_id, status="FAILED")
        raise
    wall = time.perf_counter() - started
    if results.num_terminated + results.num_errors < len(results) or len(results) < _expected_trials(study):
        # Tune catches Ctrl-C itself, saves the study and returns: that is an interrupt.
        logger.close_open_runs("KILLED")
        client.set_terminated(parent_id, status="KILLED")
        raise KeyboardInterrupt

    rows = _rows(results, study)
    if not any(r["status"] == "TERMINATED" and r.get(study.metric) is not None for r in rows):
        client.set_terminated(parent_id, status="FAILED")
        raise SmileError(f"no trial of {out} finished; see {out / EXPERIMENT_DIR} for the trials' errors")
    best = _best(rows, study)
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, out / "trials.parquet")
    record = {
        "trial_id": best["trial_id"], "metric": study.metric, "mode": study.mode,
        **{k: best.get(k) for k in ("val_acc", "val_ece", "test_acc", "test_ece", "steps", "seconds")},
        "study": {**study.summary(), "trials": len(rows), "wall_seconds": wall,
                  "trial_seconds": sum(r.get("seconds") or 0.0 for r in rows)},
        "config": {**base, **{p: best[p] for p in study.searched}},
    }
    record["config"] = make_config(record["config"]).to_dict()
    atomic_write_json(record, out / "best.json")
    plot = _plot(rows, study, out)

    for f in (Path(study.path), out / "trials.parquet", out / "best.json", plot):
        client.log_artifact(parent_id, str(f))
    client.log_batch(parent_id, metrics=[
        tracking.Metric(f"best_{study.metric}", float(best[study.metric]), int(time.time() * 1000), 0),
        tracking.Metric("best_test_acc", float(best.get("test_acc") or float("nan")), int(time.time() * 1000), 0),
        tracking.Metric("trials", float(len(rows)), int(time.time() * 1000), 0),
    ])
    logger.close_open_runs("FAILED")
    client.set_terminated(parent_id, status="FINISHED")
    return record


def _expected_trials(study: Study) -> int:
    n = study.num_samples
    for p in study.space:
        if p.kind == "grid":
            n *= len(p.args)
    return n


def _trainable(study: Study, setup: dict[str, Any]):
    r = study.resources
    fn = tune.with_parameters(trial, setup=setup)
    if r["workers"] > 1:
        # The trial only drives its TorchTrainer, whose workers share the trial's CPUs.
        return tune.with_resources(fn, {"cpu": TRIAL_DRIVER_CPU})
    return tune.with_resources(fn, {"cpu": r["cpus"], "gpu": r["gpus"]})


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
            **{k: m.get(k) for k in ("val_acc", "val_ece", "test_acc", "test_ece", "steps", "seconds") if k != study.metric},
            # STOPPED: ended early by the scheduler (ASHA)
            "status": "ERROR" if res.error else ("TERMINATED" if m.get("done") else "STOPPED"),
        })
    return sorted(rows, key=lambda r: r["trial_id"])


def _best(rows: list[dict[str, Any]], study: Study) -> dict[str, Any]:
    done = [r for r in rows if r["status"] == "TERMINATED" and r.get(study.metric) is not None]
    sign = 1 if study.mode == "max" else -1
    # Ties on the metric go to the earliest trial id (deterministic).
    return max(done, key=lambda r: (sign * r[study.metric], [-ord(c) for c in r["trial_id"]]))


def _plot(rows: list[dict[str, Any]], study: Study, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = study.searched
    cols = min(3, len(params))
    nrows = math.ceil(len(params) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
    done = [r for r in rows if r.get(study.metric) is not None]
    for ax, p in zip(axes.flat, params):
        xs = [r[p] for r in done]
        ys = [r[study.metric] for r in done]
        if xs and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs):
            ax.scatter(xs, ys, s=18)
            kind = next(q.kind for q in study.space if q.name == p)
            if kind == "loguniform":
                ax.set_xscale("log")
        else:
            labels = sorted({str(x) for x in xs})
            ax.scatter([labels.index(str(x)) for x in xs], ys, s=18)
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(p)
        ax.set_ylabel(study.metric)
    for ax in list(axes.flat)[len(params):]:
        ax.axis("off")
    fig.suptitle(f"{study.base.method} on {study.base.dataset}: {study.metric} per trial")
    fig.tight_layout()
    path = out / f"{study.metric}_vs_params.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
