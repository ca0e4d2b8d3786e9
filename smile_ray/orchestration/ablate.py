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

from smile_ray.config import find_config_file, make_config
from smile_ray.errors import SmileError
from smile_ray.metrics import IL_METRICS
from smile_ray.orchestration.progress import ablation_progress
from smile_ray.orchestration.runner import EXPERIMENT_DIR, can_resume
from smile_ray.orchestration.spaces import Definitions, check_tune_budget, load_definitions
from smile_ray.orchestration.storage import join
from smile_ray.orchestration.study import StudyRun, file_digest, saved_file
from smile_ray.orchestration.tune import tune_config
from smile_ray.reports.plots import plot_ablation
from smile_ray.reports.tables import ABLATION_LEGEND, ablation_table, ablation_title
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


def run_ablation(definitions: str | Path, output_dir: str | Path, *, drops: list[str] = (),
                 all_components: bool = False, seeds: int | None = None, max_seeds: int | None = None,
                 base_file: str | Path | None = None, overrides: dict[str, Any] | None = None, tune_budget: int = 0,
                 **options: Any) -> str:
    """Run (or ``resume``) the ablation; returns the Markdown table (also in ``ablation.md``).
    ``max_seeds`` turns on adaptive seeds (rounds of ``seeds`` more, up to ``max_seeds``).
    ``options`` are :class:`~smile_ray.orchestration.study.StudyRun`'s (``resume``,
    ``address``, ``tracking_uri``, ``experiment``, ``cache_dir``, ``storage``, ``verbose``)."""
    run = StudyRun(output_dir, kind="ablation", state_name=STATE_FILE, holds=(STATE_FILE, "ablation.parquet"),
                   **options)
    if run.resume:
        saved = run.saved
        definitions = saved_file(saved["definitions"], saved.get("definitions_sha256"), None, "--definitions",
                                 "ablations")
        drops, all_components = saved["drops"], saved["all_components"]
        seeds, overrides = saved["seeds"], saved["overrides"]
        base_file = saved["base_file"] and saved_file(saved["base_file"], saved.get("base_sha256"), None, "--base",
                                                      "presets")
        max_seeds, tune_budget = saved.get("max_seeds"), saved["tune_budget"]

    # Everything is validated before a single thing is created.
    defs = load_definitions(definitions, base_file, overrides or {}, seeds)
    arms = build_arms(defs, list(drops), all_components)
    check_tune_budget(tune_budget, bool(defs.tune_space), f"a tune_space in {defs.path}")
    if max_seeds is not None and max_seeds < defs.seeds:
        raise SmileError(f"--max-seeds={max_seeds} must be at least the first round's seeds ({defs.seeds})")
    run.start(defs.base, defs.resources)
    out = run.out

    if run.resume:
        runs, rounds, arm_configs = run.saved["runs"], run.saved["rounds"], run.saved["arm_configs"]
    else:
        base = defs.base.to_dict()
        arm_configs = {arm: tune_config(run, arm.lstrip("-").replace("+", "_"), {**base, **arm_overrides},
                                        defs.tune_space, tune_budget, defs.resources, defs.max_concurrent)
                       for arm, arm_overrides in arms.items()}
        runs = make_runs(arm_configs, [(spc, arm) for spc in defs.samples for arm in arms], range(defs.seeds))
        rounds = [list(range(len(runs)))]
    run.open_parent({}, {
        "arms": ",".join(arms), "seeds": "auto" if max_seeds else defs.seeds,
        **({"max_seeds": max_seeds} if max_seeds else {}), "samples_per_class": ",".join(map(str, defs.samples)),
        "tune_budget": tune_budget, **defs.resources.summary(),
        **{f"base.{k}": v for k, v in defs.base.to_dict().items()}})
    base_path = find_config_file(base_file).resolve() if base_file else None
    run.save({"definitions": str(defs.path.resolve()), "definitions_sha256": file_digest(defs.path),
              "drops": list(drops), "all_components": all_components, "seeds": defs.seeds, "max_seeds": max_seeds,
              "base_file": str(base_path) if base_path else None,
              "base_sha256": file_digest(base_path) if base_path else None, "overrides": overrides or {},
              "tune_budget": tune_budget, "arm_configs": arm_configs, "rounds": rounds, "runs": runs})

    arm_names = list(dict.fromkeys(r["tags"]["arm"] for r in runs))
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    r = 0
    while r < len(rounds):
        # The logger and the trainable see every run so far; this round's trials index into them.
        index = rounds[r]
        if len(rounds) > 1 or max_seeds:
            seeds_in = sorted({runs[i]["tags"]["seed"] for i in index})
            print(f"round {r + 1}: {len(index)} runs, seeds {seeds_in[0]}-{seeds_in[-1]}", file=sys.stderr)
        results = run.trials(run.setup(defs.resources, runs=runs), {"run": tune.grid_search(index)},
                             resume=run.resume and can_resume(run.root, round_dir(r)), experiment_dir=round_dir(r),
                             expected=len(index), table=ablation_progress(runs, len(index)) if run.verbose else None,
                             tune_config=tune.TuneConfig(max_concurrent_trials=defs.max_concurrent))
        if results.num_errors:
            raise run.fail(f"{results.num_errors} ablation runs failed; see {join(run.root, round_dir(r))}; "
                           "fix the cause and add --resume")
        rows += [_row(runs[res.config["run"]], res.metrics) for res in results]
        r += 1
        if r == len(rounds) and max_seeds:
            done = {spc: 1 + max(x["seed"] for x in rows if x["samples_per_class"] == spc and x["arm"] == FULL)
                    for spc in defs.samples}
            plan = next_round(rows, arm_names, done, defs.seeds, max_seeds)
            if plan:
                new = [run_ for spc, (arms_, seeds_) in plan.items()
                       for run_ in make_runs(arm_configs, [(spc, a) for a in arms_], seeds_)]
                rounds.append(list(range(len(runs), len(runs) + len(new))))
                runs += new
                run.save({"rounds": rounds, "runs": runs})

    with run.closing():
        rows.sort(key=lambda r: (r["samples_per_class"], arm_names.index(r["arm"]), r["seed"]))
        pq.write_table(pa.Table.from_pylist(rows), out / "ablation.parquet")
        table = ablation_table(rows, arm_names, FULL)
        title = ablation_title(defs.base.to_dict())
        header = (f"# {title}\n\n"
                  f"{seeds_text(rows, defs.seeds, max_seeds)}, {len(runs)} runs, {time.perf_counter() - started:.0f} s"
                  f"{f', each arm tuned with {tune_budget} trials' if tune_budget else ''}. "
                  f"Reference: the full method. {ABLATION_LEGEND}\n\n")
        if max_seeds:
            table += "\n" + resolution_text(rows, arm_names, max_seeds)
        (out / "ablation.md").write_text(header + table)
        plot = plot_ablation(rows, arm_names, out / "ablation.png", f"{title}: test accuracy per arm")
        run.finish([out / "ablation.parquet", out / "ablation.md", plot, defs.path])
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
