"""``smile-ray ablate``: component ablations over shared seeds, with paired statistics
(orchestration layer).

Arms: the full method, and one arm per ``--drop`` (``a+b`` drops several components in
one arm; ``--all`` is leave-one-component-out). Every arm runs on the same seeds (same
data subsets, initialisations and draws) and, optionally, several ``samples_per_class``
values; all runs are Ray Tune trials in parallel, each tracked as a nested MLflow run.
With ``--tune-budget T`` each arm first gets its own HyperOpt search of T trials on the
validation split over the parameters it still uses, then runs its seeds with its own
best config, so a component is not judged on hyper-parameters tuned for the full method.

Statistics per arm against the full method, over shared seeds (Agarwal et al. 2021;
Bouthillier et al. 2021): mean +- std test accuracy, the mean paired difference with a
95 % percentile-bootstrap interval (``scipy.stats.bootstrap``, 10,000 resamples), the
probability of improvement ``P(arm > full)`` (the Mann-Whitney U statistic over
``n * m``, ties counting half) and a paired t-test's p-value (``scipy.stats.ttest_rel``).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from ray import tune
from scipy import stats

from smile_ray import tracking
from smile_ray.config import load_config_values, make_config
from smile_ray.distributed import connect
from smile_ray.errors import SmileError
from smile_ray.methods import METHODS
from smile_ray.pretrain import load_source
from smile_ray.study import parse_param, read_sections
from smile_ray.tune import run_study, trial

FULL = "full"
TOP_LEVEL = ("base", "seeds", "samples_per_class", "max_concurrent", "components", "tune_space")


@dataclass(frozen=True)
class Definitions:
    path: Path
    base: dict[str, Any]
    seeds: int
    samples: list[int]
    max_concurrent: int
    components: dict[str, dict[str, Any]]
    tune_space: dict[str, Any]


def load_definitions(path: str | Path, base_file: str | Path | None, overrides: dict[str, Any],
                     seeds: int | None) -> Definitions:
    path = Path(path)
    raw = read_sections(path, TOP_LEVEL, "components")
    if base_file is not None:
        base = load_config_values(base_file)
        where = str(base_file)
    else:
        base = raw.get("base") or {}
        where = f"{path}: base"
        if isinstance(base, str):
            base = load_config_values(path.parent / base)
    if not isinstance(base, dict):
        raise SmileError(f"{where}: not a config")
    base = make_config(base, where=where).to_dict()
    if overrides:
        base = make_config({**base, **overrides}, where="--set").to_dict()

    components = raw.get("components")
    if not isinstance(components, dict) or not components:
        raise SmileError(f"{path}: components must map names to the overrides that turn them off")
    for name, off in components.items():
        if not isinstance(off, dict) or not off:
            raise SmileError(f"{path}: components.{name} must be a mapping of config overrides")
        make_config({**base, **off}, where=f"{path}: components.{name}")

    n = seeds if seeds is not None else raw.get("seeds", 5)
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise SmileError(f"{'--seeds' if seeds is not None else str(path) + ': seeds'}={n!r}: a paired test needs at least 2 seeds")
    samples = raw.get("samples_per_class", [base["samples_per_class"]])
    samples = samples if isinstance(samples, list) else [samples]
    for spc in samples:
        make_config({**base, "samples_per_class": spc}, where=f"{path}: samples_per_class")
    concurrent = raw.get("max_concurrent", 2)
    if isinstance(concurrent, bool) or not isinstance(concurrent, int) or concurrent < 1:
        raise SmileError(f"{path}: max_concurrent={concurrent!r} must be an integer >= 1")
    tune_space = raw.get("tune_space") or {}
    if not isinstance(tune_space, dict):
        raise SmileError(f"{path}: tune_space must map config keys to distributions")
    cfg = make_config(base)
    for name, spec in tune_space.items():
        parse_param(path, name, spec, cfg)
    return Definitions(path, base, n, [int(s) for s in samples], concurrent, dict(components), tune_space)


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
    verbose: int = 1,
) -> str:
    """Run the ablation; returns the Markdown table (also in ``ablation.md``)."""
    out = Path(output_dir).resolve()
    defs = load_definitions(definitions, base_file, overrides or {}, seeds)
    arms = build_arms(defs, list(drops), all_components)
    if tune_budget < 0:
        raise SmileError(f"--tune-budget={tune_budget} must be >= 0")
    if tune_budget and not defs.tune_space:
        raise SmileError(f"--tune-budget needs a tune_space in {defs.path}")
    if (out / "ablation.parquet").exists():
        raise SmileError(f"{out} already holds an ablation; use another --output")
    uri = tracking_uri or tracking.default_tracking_uri()
    client = tracking.connect(uri)
    experiment = experiment or f"smile-ray-{defs.base['dataset']}"
    connect(address)
    load_source(make_config(defs.base), cache_dir)
    out.mkdir(parents=True, exist_ok=True)

    arm_configs = {}
    for arm, arm_overrides in arms.items():
        config = {**defs.base, **arm_overrides}
        if tune_budget:
            config = _tune_arm(arm, config, defs, tune_budget, out, uri, experiment, cache_dir, address)
        arm_configs[arm] = config
    runs = [
        {"arm": arm, "dropped": arm[1:] if arm != FULL else "", "seed": seed, "samples_per_class": spc,
         "config": make_config({**arm_configs[arm], "seed": seed, "samples_per_class": spc}).to_dict()}
        for spc in defs.samples for arm in arms for seed in range(defs.seeds)
    ]

    exp_id = tracking.experiment_id(client, experiment, uri)
    parent_id = client.create_run(exp_id, run_name=out.name, tags={"study": out.name, "kind": "ablation"}).info.run_id
    client.log_batch(parent_id, params=tracking.flat_params(
        {"arms": ",".join(arms), "seeds": defs.seeds, "samples_per_class": ",".join(map(str, defs.samples)),
         "tune_budget": tune_budget, **{f"base.{k}": v for k, v in defs.base.items()}}))
    logger = tracking.StudyLogger(uri, exp_id, parent_id, out.name, defs.base, runs=runs)
    setup = {"runs": runs, "cache_dir": str(cache_dir) if cache_dir else None, "workers": 1, "gpus": 0, "cpus": 1}
    started = time.perf_counter()
    try:
        results = tune.Tuner(
            tune.with_resources(tune.with_parameters(trial, setup=setup), {"cpu": 1}),
            param_space={"run": tune.grid_search(list(range(len(runs))))},
            tune_config=tune.TuneConfig(max_concurrent_trials=defs.max_concurrent),
            run_config=tune.RunConfig(name="tune", storage_path=str(out), callbacks=[logger], verbose=verbose,
                                      failure_config=tune.FailureConfig(max_failures=1)),
        ).fit()
    except BaseException:
        logger.close_open_runs("FAILED")
        client.set_terminated(parent_id, status="FAILED")
        raise
    if results.num_terminated < len(runs):
        logger.close_open_runs("KILLED")
        client.set_terminated(parent_id, status="KILLED" if results.num_errors == 0 else "FAILED")
        if results.num_errors:
            raise SmileError(f"{results.num_errors} ablation runs failed; see {out / 'tune'}")
        raise KeyboardInterrupt

    rows = []
    for res in results:
        spec = runs[res.config["run"]]
        m = res.metrics
        rows.append({"arm": spec["arm"], "dropped": spec["dropped"], "seed": spec["seed"],
                     "samples_per_class": spec["samples_per_class"], "config": json.dumps(spec["config"], sort_keys=True),
                     "val_acc": m["val_acc"], "test_acc": m["test_acc"], "test_ece": m["test_ece"],
                     "seconds": m["seconds"]})
    rows.sort(key=lambda r: (r["samples_per_class"], list(arms).index(r["arm"]), r["seed"]))
    pq.write_table(pa.Table.from_pylist(rows), out / "ablation.parquet")
    table = summarise(rows, list(arms))
    header = (f"# Ablation of {defs.base['method']} on {defs.base['dataset']}\n\n"
              f"{defs.seeds} seeds per arm, {len(runs)} runs, {time.perf_counter() - started:.0f} s"
              f"{f', each arm tuned with {tune_budget} trials' if tune_budget else ''}. "
              "diff = arm - full in test accuracy (points), paired over seeds; CI: 95 % bootstrap; "
              "P(>full): probability of improvement; p: paired t-test.\n\n")
    (out / "ablation.md").write_text(header + table)
    plot = _plot(rows, list(arms), out)
    for f in (out / "ablation.parquet", out / "ablation.md", plot, defs.path):
        client.log_artifact(parent_id, str(f))
    logger.close_open_runs("FAILED")
    client.set_terminated(parent_id, status="FINISHED")
    return table


def _tune_arm(arm, config, defs, budget, out, uri, experiment, cache_dir, address) -> dict[str, Any]:
    """HyperOpt search of ``budget`` trials for one arm over the parameters it still uses."""
    unused = METHODS.get(config["method"]).unused_keys(make_config(config))
    space = {k: v for k, v in defs.tune_space.items() if k not in unused}
    if not space:
        return config
    folder = out / "tuning" / arm.lstrip("-").replace("+", "_")
    folder.mkdir(parents=True, exist_ok=True)
    space_file = folder.parent / f"{folder.name}.yaml"
    space_file.write_text(yaml.safe_dump({"base": config, "metric": "val_acc", "num_samples": budget,
                                          "max_concurrent": defs.max_concurrent, "space": space}))
    best = run_study(space_file, folder, tracking_uri=uri, experiment=experiment, cache_dir=cache_dir,
                     address=address, verbose=0)
    return {**config, **{k: best["config"][k] for k in space}}


def summarise(rows: list[dict[str, Any]], arms: list[str]) -> str:
    """The Markdown table: per samples_per_class and arm, statistics against the full method."""
    lines = ["| samples/class | arm | test acc (mean ± std) | diff vs full | 95 % CI | P(>full) | p |",
             "|---|---|---|---|---|---|---|"]
    for spc in sorted({r["samples_per_class"] for r in rows}):
        by_arm = {a: {r["seed"]: 100 * r["test_acc"] for r in rows if r["arm"] == a and r["samples_per_class"] == spc}
                  for a in arms}
        full = by_arm[FULL]
        for arm in arms:
            acc = by_arm[arm]
            vals = np.array([acc[s] for s in sorted(acc)])
            cell = f"{vals.mean():.2f} ± {vals.std(ddof=1):.2f}"
            if arm == FULL:
                lines.append(f"| {spc} | {arm} | {cell} | | | | |")
                continue
            s = paired_stats([full[k] for k in sorted(full)], [acc[k] for k in sorted(full)])
            lines.append(f"| {spc} | {arm} | {cell} | {s['diff']:+.2f} | [{s['ci_low']:+.2f}, {s['ci_high']:+.2f}] "
                         f"| {s['p_improve']:.2f} | {s['p_value']:.3f} |")
    return "\n".join(lines) + "\n"


def paired_stats(full: list[float], arm: list[float]) -> dict[str, float]:
    """Paired comparison of an arm with the full method over the same seeds."""
    full_a, arm_a = np.asarray(full, float), np.asarray(arm, float)
    diff = arm_a - full_a
    if np.ptp(diff) == 0:
        low = high = float(diff[0])
    else:
        ci = stats.bootstrap((diff,), np.mean, confidence_level=0.95, n_resamples=10000, method="percentile",
                             random_state=0).confidence_interval
        low, high = float(ci.low), float(ci.high)
    u = stats.mannwhitneyu(arm_a, full_a, alternative="two-sided").statistic
    p = stats.ttest_rel(arm_a, full_a).pvalue if np.ptp(diff) > 0 else 1.0
    return {"diff": float(diff.mean()), "ci_low": low, "ci_high": high,
            "p_improve": float(u / (len(arm_a) * len(full_a))), "p_value": float(p)}


def _plot(rows: list[dict[str, Any]], arms: list[str], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["samples_per_class"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(1.2 * len(arms) + 2, 3.6), squeeze=False)
    for ax, spc in zip(axes[0], sizes):
        for i, arm in enumerate(arms):
            accs = np.array([100 * r["test_acc"] for r in rows if r["arm"] == arm and r["samples_per_class"] == spc])
            ax.scatter(np.full(len(accs), i) + np.linspace(-0.12, 0.12, len(accs)), accs, s=14, alpha=0.7)
            if len(accs) > 1:
                ci = stats.bootstrap((accs,), np.mean, n_resamples=2000, method="percentile",
                                     random_state=0).confidence_interval if np.ptp(accs) > 0 else None
                low, high = (ci.low, ci.high) if ci is not None else (accs[0], accs[0])
                ax.errorbar([i + 0.3], [accs.mean()], yerr=[[accs.mean() - low], [high - accs.mean()]], fmt="o",
                            color="black", capsize=3)
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{spc} samples/class")
    fig.tight_layout()
    path = out / "ablation.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
