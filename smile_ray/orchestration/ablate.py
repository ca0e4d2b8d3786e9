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

Adaptive seeds (``--seeds auto --max-seeds M``): the first round runs the definitions'
``seeds`` (0..K-1) in every arm; after each round, an arm whose paired 95 % interval
against the full method excludes zero is *resolved* and gets no more seeds. While some
arm of a data size is unresolved and fewer than M seeds have run, the next round adds K
more seeds (capped at M) to the full method and to the unresolved arms of that size
only; finished runs are never re-run. Each round is its own Tune experiment
(``tune``, ``tune-round2``, ...), so ``--resume`` continues inside the round that was
interrupted. The table pairs each arm with the full method over the seeds both ran and
says which arms resolved, at how many seeds. This is sequential testing and the
intervals are not corrected for the repeated looks (``docs/method.md``, Statistics).

Statistics: :mod:`smile_ray.stats`; tables and plots: :mod:`smile_ray.reports`.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from ray import tune

from smile_ray.checkpoint import check_writable, write_json
from smile_ray.config import find_config_file, make_config
from smile_ray.errors import SmileError
from smile_ray.metrics import IL_METRICS
from smile_ray.orchestration import tracking
from smile_ray.orchestration.cluster import check_address, connect
from smile_ray.orchestration.progress import ablation_progress
from smile_ray.orchestration.runner import (EXPERIMENT_DIR, can_resume, check_cluster, closing_on_error, file_digest,
                                            finish, run_trials, saved_file, storage_root)
from smile_ray.orchestration.storage import check_storage, join
from smile_ray.orchestration.spaces import Definitions, load_definitions
from smile_ray.orchestration.tune import tune_config
from smile_ray.pretrain import load_source
from smile_ray.reports.plots import plot_ablation
from smile_ray.reports.tables import ABLATION_LEGEND, ablation_table
from smile_ray.stats import paired_stats

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
        if len(spec) > 1 and set(spec) == set(valid):
            # one arm without every part the file names; an arm dropping a file's only
            # component is the method without that part, and is allowed
            raise SmileError(f"dropping every component ({'+'.join(spec)}) leaves an empty method")
        overrides: dict[str, Any] = {}
        for c in spec:
            overrides.update(defs.components[c])
        arms["-" + "+".join(spec)] = overrides
    return arms


def round_dir(r: int) -> str:
    """Tune experiment directory of round ``r`` (0-based): round 0's is the plain one."""
    return EXPERIMENT_DIR if r == 0 else f"{EXPERIMENT_DIR}-round{r + 1}"


def make_runs(arm_configs: dict[str, dict[str, Any]], cells: list[tuple[int, str]], seeds: range) -> list[dict]:
    """A run (tags and full config) per (samples_per_class, arm) cell and seed."""
    return [{"tags": {"arm": arm, "seed": seed, "samples_per_class": spc},
             "config": make_config({**arm_configs[arm], "seed": seed, "samples_per_class": spc}).to_dict()}
            for spc, arm in cells for seed in seeds]


def resolution(rows: list[dict[str, Any]], arms: list[str]) -> dict[tuple[int, str], dict[str, Any]]:
    """Per (samples_per_class, arm other than full): the seeds it shares with the full
    method, and whether its paired 95 % interval excludes zero."""
    acc = {(r["samples_per_class"], r["arm"], r["seed"]): r["test_acc"] for r in rows}
    out = {}
    for spc in sorted({r["samples_per_class"] for r in rows}):
        for arm in arms:
            if arm == FULL:
                continue
            shared = sorted(s for (c, a, s) in acc if c == spc and a == arm and (spc, FULL, s) in acc)
            if len(shared) < 2:
                continue
            st = paired_stats([100 * acc[spc, FULL, s] for s in shared], [100 * acc[spc, arm, s] for s in shared])
            out[spc, arm] = {"seeds": len(shared), "resolved": bool(st["ci_low"] > 0 or st["ci_high"] < 0),
                             "ci": [st["ci_low"], st["ci_high"]]}
    return out


def next_round(rows, arms, seeds_done: dict[int, int], step: int, max_seeds: int) -> dict[int, tuple[list[str], range]]:
    """samples_per_class -> (the arms to run, the new seeds) for the next round; empty
    when every arm resolved or reached ``max_seeds``."""
    res = resolution(rows, arms)
    plan = {}
    for spc, done in seeds_done.items():
        open_arms = [a for a in arms if a != FULL and not res.get((spc, a), {}).get("resolved")]
        if open_arms and done < max_seeds:
            plan[spc] = ([FULL, *open_arms], range(done, min(done + step, max_seeds)))
    return plan


def run_ablation(
    definitions: str | Path,
    output_dir: str | Path,
    *,
    drops: list[str] = (),
    all_components: bool = False,
    seeds: int | None = None,
    max_seeds: int | None = None,
    base_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    tune_budget: int = 0,
    address: str | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    cache_dir: str | Path | None = None,
    resume: bool = False,
    verbose: int = 1,
    storage: str | None = None,
) -> str:
    """Run (or ``resume``) the ablation; returns the Markdown table (also in ``ablation.md``).
    ``max_seeds`` turns on adaptive seeds (rounds of ``seeds`` more, up to ``max_seeds``).
    ``storage``: where the runs keep their files on a cluster of several nodes."""
    out = Path(output_dir).resolve()
    if resume:
        saved = json.loads((out / STATE_FILE).read_text()) if (out / STATE_FILE).is_file() else {}
        if not saved or not can_resume(saved.get("storage_root") or out, round_dir(0)):
            raise SmileError(f"--resume: {out} holds no ablation to resume")
        storage = saved.get("storage")
        definitions = saved_file(saved["definitions"], saved.get("definitions_sha256"), None, "--definitions",
                                 "ablations")
        drops, all_components = saved["drops"], saved["all_components"]
        seeds, overrides = saved["seeds"], saved["overrides"]
        base_file = saved["base_file"] and saved_file(saved["base_file"], saved.get("base_sha256"), None, "--base",
                                                      "presets")
        max_seeds = saved.get("max_seeds")
        tune_budget, tracking_uri, experiment = saved["tune_budget"], saved["tracking_uri"], saved["experiment"]
    elif (out / STATE_FILE).exists() or (out / "ablation.parquet").exists():
        raise SmileError(f"{out} already holds an ablation; use --resume, or another --output")

    # Everything is validated before a single thing is created.
    defs = load_definitions(definitions, base_file, overrides or {}, seeds)
    arms = build_arms(defs, list(drops), all_components)
    if tune_budget < 0:
        raise SmileError(f"--tune-budget={tune_budget} must be >= 0")
    if max_seeds is not None and max_seeds < defs.seeds:
        raise SmileError(f"--max-seeds={max_seeds} must be at least the first round's seeds ({defs.seeds})")
    if tune_budget and not defs.tune_space:
        raise SmileError(f"--tune-budget needs a tune_space in {defs.path}")
    check_writable(out, given=output_dir)
    check_address(address)  # before the tracking store, which a sqlite URI creates
    root = storage_root(out, storage)
    if storage:
        check_storage(storage, root, fresh=not resume)
    uri = tracking_uri or tracking.default_tracking_uri()
    client = tracking.connect(uri)
    experiment = experiment or f"smile-ray-{defs.base.dataset}"
    connect(address)
    check_cluster(storage, defs.resources, address)
    load_source(defs.base, cache_dir)
    out.mkdir(parents=True, exist_ok=True)

    exp_id = tracking.experiment_id(client, experiment, uri)
    if resume:
        runs, parent_id, rounds = saved["runs"], saved["parent_run_id"], saved.get("rounds")
        arm_configs = saved.get("arm_configs")
        rounds = rounds or [list(range(len(runs)))]  # an ablation saved before adaptive seeds
        client.update_run(parent_id, status="RUNNING")
    else:
        base = defs.base.to_dict()
        arm_configs = {}
        for arm, arm_overrides in arms.items():
            config = {**base, **arm_overrides}
            if tune_budget:
                name = arm.lstrip("-").replace("+", "_")
                config = tune_config(config, defs.tune_space, tune_budget, out / "tuning" / name, defs.resources,
                                     defs.max_concurrent, tracking_uri=uri, experiment=experiment,
                                     cache_dir=cache_dir, address=address,
                                     root=join(root, "tuning", name) if storage else None)
            arm_configs[arm] = config
        runs = make_runs(arm_configs, [(spc, arm) for spc in defs.samples for arm in arms], range(defs.seeds))
        rounds = [list(range(len(runs)))]
        parent_id = client.create_run(exp_id, run_name=out.name, tags={"study": out.name, "kind": "ablation",
                                                                       **tracking.code_version()}).info.run_id
        client.log_batch(parent_id, params=tracking.flat_params(
            {"arms": ",".join(arms), "seeds": "auto" if max_seeds else defs.seeds,
             **({"max_seeds": max_seeds} if max_seeds else {}), "samples_per_class": ",".join(map(str, defs.samples)),
             "tune_budget": tune_budget, **defs.resources.summary(), **{f"base.{k}": v for k, v in base.items()}}))
    base_path = find_config_file(base_file).resolve() if base_file else None
    state = {"definitions": str(defs.path.resolve()), "definitions_sha256": file_digest(defs.path), "drops": list(drops),
             "all_components": all_components, "seeds": defs.seeds, "max_seeds": max_seeds,
             "base_file": str(base_path) if base_path else None,
             "base_sha256": file_digest(base_path) if base_path else None, "overrides": overrides or {},
             "tune_budget": tune_budget, "tracking_uri": uri, "experiment": experiment,
             "parent_run_id": parent_id, "mlflow_ui": tracking.ui_link(uri, exp_id, parent_id),
             "arm_configs": arm_configs, "rounds": rounds, "runs": runs, "storage": storage, "storage_root": root}
    if resume:
        state = {**saved, **{k: state[k] for k in ("arm_configs", "rounds", "max_seeds")}}
    write_json(state, out / STATE_FILE)

    arm_names = list(dict.fromkeys(r["tags"]["arm"] for r in runs))
    setup = {"cache_dir": str(cache_dir) if cache_dir else None, "resources": defs.resources}
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    r = 0
    while r < len(rounds):
        # The logger and the trainable see every run so far; this round's trials index into them.
        logger = tracking.StudyLogger(uri, exp_id, parent_id, out.name, defs.base.to_dict(), runs=runs)
        index = rounds[r]
        if len(rounds) > 1 or max_seeds:
            seeds_in = sorted({runs[i]["tags"]["seed"] for i in index})
            print(f"round {r + 1}: {len(index)} runs, seeds {seeds_in[0]}-{seeds_in[-1]}", file=sys.stderr)
        results = run_trials(out, {**setup, "runs": runs}, {"run": tune.grid_search(index)}, logger,
                             resume=resume and can_resume(root, round_dir(r)), experiment_dir=round_dir(r), root=root,
                             expected=len(index), table=ablation_progress(runs, len(index)) if verbose else None,
                             tune_config=tune.TuneConfig(max_concurrent_trials=defs.max_concurrent))
        if results.num_errors:
            logger.close_open_runs("FAILED")
            client.set_terminated(parent_id, status="FAILED")
            raise SmileError(f"{results.num_errors} ablation runs failed; see {join(root, round_dir(r))}; "
                             "fix the cause and add --resume")
        rows += [_row(runs[res.config["run"]], res.metrics) for res in results]
        r += 1
        if r == len(rounds) and max_seeds:
            done = {spc: 1 + max(x["seed"] for x in rows if x["samples_per_class"] == spc and x["arm"] == FULL)
                    for spc in defs.samples}
            plan = next_round(rows, arm_names, done, defs.seeds, max_seeds)
            if plan:
                new = [run for spc, (arms_, seeds_) in plan.items()
                       for run in make_runs(arm_configs, [(spc, a) for a in arms_], seeds_)]
                rounds.append(list(range(len(runs), len(runs) + len(new))))
                runs += new
                write_json({**state, "rounds": rounds, "runs": runs}, out / STATE_FILE)

    with closing_on_error(logger):
        rows.sort(key=lambda r: (r["samples_per_class"], arm_names.index(r["arm"]), r["seed"]))
        pq.write_table(pa.Table.from_pylist(rows), out / "ablation.parquet")
        table = ablation_table(rows, arm_names, FULL)
        b = defs.base
        what = f"{b.method} on {b.dataset} ({b.backbone}, {b.steps} steps)"
        header = (f"# Ablation of {what}\n\n"
                  f"{seeds_text(rows, defs.seeds, max_seeds)}, {len(runs)} runs, {time.perf_counter() - started:.0f} s"
                  f"{f', each arm tuned with {tune_budget} trials' if tune_budget else ''}. "
                  f"Reference: the full method. {ABLATION_LEGEND}\n\n")
        if max_seeds:
            table += "\n" + resolution_text(rows, arm_names, max_seeds)
        (out / "ablation.md").write_text(header + table)
        plot = plot_ablation(rows, arm_names, out / "ablation.png", f"Ablation of {what}: test accuracy per arm")
        finish(logger, [out / "ablation.parquet", out / "ablation.md", plot, defs.path])
    return table



def _row(spec: dict[str, Any], m: dict[str, Any]) -> dict[str, Any]:
    return {**spec["tags"], "dropped": spec["tags"]["arm"].lstrip("-") if spec["tags"]["arm"] != FULL else "",
            "config": json.dumps(spec["config"], sort_keys=True),
            "val_acc": m["val_acc"], "test_acc": m["test_acc"], "test_ece": m["test_ece"],
            "seconds": m["seconds"], **{k: m.get(k) for k in IL_METRICS}}


def seeds_text(rows: list[dict[str, Any]], first: int, max_seeds: int | None) -> str:
    if not max_seeds:
        return f"{first} seeds per arm"
    most = 1 + max(r["seed"] for r in rows)
    return f"adaptive seeds ({first} per round, at most {max_seeds}; {most} ran)"


def resolution_text(rows: list[dict[str, Any]], arms: list[str], max_seeds: int) -> str:
    """Which arms' intervals came to exclude zero, at how many seeds, and which did not."""
    lines = []
    for (spc, arm), r in resolution(rows, arms).items():
        if r["resolved"]:
            lines.append(f"- {spc}/class, {arm}: resolved at {r['seeds']} seeds "
                         f"(95 % CI [{r['ci'][0]:+.2f}, {r['ci'][1]:+.2f}] excludes 0)")
        else:
            lines.append(f"- {spc}/class, {arm}: not resolved at {r['seeds']} seeds (the maximum, {max_seeds}; "
                         f"95 % CI [{r['ci'][0]:+.2f}, {r['ci'][1]:+.2f}])")
    return ("Adaptive seeds: each arm ran until its interval excluded zero or it reached --max-seeds. The "
            "intervals are not corrected for the repeated looks (a null arm 'resolves' more often than 5 %): "
            "confirm a resolved arm on fresh seeds.\n\n") + \
        "\n".join(lines) + "\n"
