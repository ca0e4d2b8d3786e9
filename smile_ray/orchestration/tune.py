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

from smile_ray.checkpoint import write_json
from smile_ray.config import make_config
from smile_ray.methods import method_class
from smile_ray.metrics import RESULT_KEYS
from smile_ray.orchestration.cluster import user_error
from smile_ray.orchestration.progress import study_progress
from smile_ray.orchestration.runner import EXPERIMENT_DIR
from smile_ray.orchestration.spaces import Param, Study, load_study, tuning_study
from smile_ray.orchestration.storage import join
from smile_ray.orchestration.study import StudyRun, file_digest, saved_file
from smile_ray.orchestration.trainable import SPREAD_KEYS
from smile_ray.reports.plots import plot_study


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


def run_study(space: str | Path | Study | None, output_dir: str | Path, *, num_samples: int | None = None,
              overrides: dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
    """Run (or ``resume``) a study; returns the best trial's record (best.json).

    ``space`` is a space file (a path or a shipped name) or a :class:`Study` already
    built in memory (an arm's or a method's tuning, :func:`tune_config`). ``options``
    are :class:`~smile_ray.orchestration.study.StudyRun`'s (``resume``, ``address``,
    ``tracking_uri``, ``experiment``, ``cache_dir``, ``storage``, ``root``, ``verbose``)."""
    run = StudyRun(output_dir, kind="study", state_name="study.json", holds=(EXPERIMENT_DIR,), **options)
    if run.resume:
        saved = run.saved
        space = saved_file(saved["space_file"], saved.get("space_sha256"), space, "--space", "search_spaces")
        num_samples, overrides = saved["num_samples"], saved["overrides"]

    # Everything is validated before a single thing is created.
    study = space if isinstance(space, Study) else load_study(space, overrides, num_samples)
    run.start(study.base, study.resources)
    base = study.base.to_dict()
    run.open_parent({"method": study.base.method, "dataset": study.base.dataset},
                    {**study.summary(), **{f"base.{k}": v for k, v in base.items()}})
    run.save({"space_file": str(study.path.resolve()), "space_sha256": file_digest(study.path),
              "num_samples": study.num_samples, "overrides": overrides or {}})

    out = run.out
    started = time.perf_counter()
    earlier = run.state.get("wall_seconds", 0.0)  # of the parts before a resume
    try:
        results = run.trials(
            run.setup(study.resources, base=base, replicates=study.replicates),
            {p.name: to_tune(p) for p in study.space}, expected=expected_trials(study),
            table=study_progress(study.searched, study.metric, study.mode, expected_trials(study)) if run.verbose
            else None,
            tune_config=tune.TuneConfig(
                metric=study.metric, mode=study.mode, num_samples=study.num_samples,
                search_alg=_search_alg(study, base), scheduler=_scheduler(study),
                max_concurrent_trials=study.max_concurrent,
            ),
        )
    finally:
        wall = earlier + time.perf_counter() - started
        run.save({"wall_seconds": wall})

    with run.closing():
        rows = _rows(results, study)
        if not any(r["status"] == "TERMINATED" and r.get(study.metric) is not None for r in rows):
            # a trial's own one-line error (e.g. a GPU where CUDA does not work) says it best
            causes = [c for c in map(user_error, results.errors) if c is not None]
            why = f": {causes[0]}" if causes else f"; see {join(run.root, EXPERIMENT_DIR)} for the trials' errors"
            raise run.fail(f"no trial of {out} finished{why}")
        best = _best(rows, study)
        pq.write_table(pa.Table.from_pylist(rows), out / "trials.parquet")
        record = {
            "trial_id": best["trial_id"], "metric": study.metric, "mode": study.mode,
            **{k: best.get(k) for k in RESULT_KEYS},
            **({"replicates": _replicates(best, study)} if study.replicates > 1 else {}),
            "study": {**study.summary(), "searched": study.searched, "trials": len(rows), "wall_seconds": wall,
                      "trial_seconds": sum(r.get("seconds") or 0.0 for r in rows)},
            "config": make_config({**base, **{p: best[p] for p in study.searched}}).to_dict(),
        }
        write_json(record, out / "best.json")
        plot = plot_study(rows, study, out / f"{study.metric}_vs_params.png")
        run.study_logger.log_best_model(best["trial_id"])  # the best trial's model/ as the parent's best_model/
        run.finish([Path(study.path), out / "trials.parquet", out / "best.json", plot], {
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


def tune_config(parent: StudyRun, name: str, config: dict[str, Any], space: dict[str, Any], budget: int,
                resources, max_concurrent: int) -> dict[str, Any]:
    """``config`` with the best of ``budget`` HyperOpt trials (on validation) over the
    keys of ``space`` its method reads (``config`` itself when there is no budget or
    nothing left to search): how ``ablate`` and ``compare`` tune each arm or method of
    the study ``parent`` before its seeds run. The tuning study goes to
    ``tuning/<name>`` of the parent's output and storage, with its tracking, experiment
    and cluster; it is built in memory, and ``tuning/<name>.yaml`` records it as a space
    file (logged on its parent run; ``smile-ray tune --space`` reruns it)."""
    if not budget:
        return config
    unused = method_class(config["method"]).unused_keys(make_config(config))
    space = {k: v for k, v in space.items() if k not in unused}
    if not space:
        return config
    folder = parent.out / "tuning" / name
    folder.mkdir(parents=True, exist_ok=True)
    record = folder.parent / f"{folder.name}.yaml"
    study, raw = tuning_study(record, config, space, budget, resources, max_concurrent)
    record.write_text(yaml.safe_dump(raw))
    best = run_study(study, folder, verbose=0, tracking_uri=parent.uri, experiment=parent.experiment,
                     cache_dir=parent.cache_dir, address=parent.address,
                     root=join(parent.root, "tuning", name) if parent.storage else None)
    return {**config, **{k: best["config"][k] for k in space}}
