"""``smile-ray report``: one Markdown report, with its plots, from output directories.

Each directory is read for what it is:

* a **run** (``smile-ray train``): ``metrics.json``;
* a **study** (``smile-ray tune``): ``trials.parquet`` and ``best.json``;
* an **ablation** (``smile-ray ablate``): ``ablation.parquet``;
* a **comparison** (``smile-ray compare``): ``results.parquet`` (with ``compare.json``,
  its state file, for the order of its columns and its reference method).

Everything is read from recorded state (JSON, parquet), never from the Markdown tables
the commands wrote: titles, columns and the reference are recomputed or read from the
state file, so a table's wording can change without breaking a report.

For studies, ablations and comparisons the per-run ``metrics.json`` files inside the
directory (the trial directories Ray Tune keeps) add training curves, reliability
diagrams and interpolation losses; each is matched to its row by its config (ablations,
comparisons) or its trial id (studies). Tables are recomputed from the parquet rows, so
a report made with this version shows the current statistics (MDE, IQM) even for older
results.

Images go to ``<report stem>_files/`` beside the report and are linked relatively, so
the report and its folder can be moved together. Every input is read and checked before
anything is written: a directory that is none of the above, or a file that does not
read, is one :class:`~smile_ray.errors.SmileError` naming it.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyarrow.parquet as pq

from smile_ray.checkpoint import atomic_write
from smile_ray.errors import SmileError
from smile_ray.metrics import IL_METRICS, REPLICATE_KEY, RESULT_KEYS
from smile_ray.reports import plots
from smile_ray.reports.tables import (ABLATION_LEGEND, COMPARE_LEGEND, ablation_table, ablation_title, compare_table,
                                      comparison_title, il_table, reference_method, size_difference_table,
                                      size_differences)

#: what identifies each kind of output directory (the first kind that matches wins)
KINDS = {
    "ablation": ("ablation.parquet",),
    "comparison": ("results.parquet",),
    "study": ("trials.parquet", "best.json"),
    "run": ("metrics.json",),
}
#: a comparison's state file (``smile-ray compare``): its columns in order and its reference
COMPARE_STATE = "compare.json"
#: most panels in one grid of reliability diagrams
MAX_RELIABILITY_PANELS = 8
#: most trials listed in a study's table
MAX_TRIAL_ROWS = 40


@dataclass
class Recorded:
    """One output directory, read: what a run or study recorded."""

    path: Path
    kind: str
    rows: list[dict[str, Any]] = field(default_factory=list)  # parquet rows (study, ablation, comparison)
    state: dict[str, Any] = field(default_factory=dict)  # compare.json
    best: dict[str, Any] = field(default_factory=dict)  # best.json
    metrics: dict[str, Any] = field(default_factory=dict)  # a run's metrics.json
    runs: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)  # per-run metrics.json inside


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SmileError(f"{path} is not readable JSON ({e.__class__.__name__})") from None


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a truncated or foreign file
        raise SmileError(f"{path} is not a readable parquet table ({e.__class__.__name__})") from None


def _need(path: Path, record: Any, keys: tuple[str, ...]) -> None:
    rows = record if isinstance(record, list) else [record]
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise SmileError(f"{path} holds no smile-ray results")
    missing = [k for k in keys if k not in rows[0]]
    if missing:
        raise SmileError(f"{path} is not a smile-ray result file: it lacks {', '.join(missing)}")


def read_recorded(path: str | Path) -> Recorded:
    """Read one output directory; a :class:`SmileError` if it is not one."""
    d = Path(path)
    if not d.is_dir():
        raise SmileError(f"{d}: no such directory")
    kind = next((k for k, files in KINDS.items() if all((d / f).is_file() for f in files)), None)
    if kind is None:
        raise SmileError(f"{d} is not a smile-ray output directory (it holds none of metrics.json, "
                         "trials.parquet + best.json, ablation.parquet, results.parquet)")
    src = Recorded(d, kind)
    if kind == "run":
        src.metrics = _read_json(d / "metrics.json")
        _need(d / "metrics.json", src.metrics, ("config", "test_acc", "val_acc"))
        return src
    if kind == "study":
        src.rows, src.best = _read_parquet(d / "trials.parquet"), _read_json(d / "best.json")
        _need(d / "trials.parquet", src.rows, ("trial_id", "status"))
        _need(d / "best.json", src.best, ("trial_id", "metric", "config"))
    else:
        (table,) = KINDS[kind]
        src.rows = _read_parquet(d / table)
        _need(d / table, src.rows, ("seed", "test_acc", "config") + (("arm", "samples_per_class") if kind == "ablation"
                                                                      else ("method", "setting")))
        if kind == "comparison" and (d / COMPARE_STATE).is_file():
            src.state = _read_json(d / COMPARE_STATE)
    for f in sorted(d.rglob("metrics.json")):
        try:
            m = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # a trial that was writing when interrupted: its row says so
        if isinstance(m, dict) and isinstance(m.get("config"), dict):
            src.runs.append((f, m))
    return src


# ------------------------------------------------------------------ the report


class Report:
    """Markdown lines and the images they link."""

    def __init__(self, output: Path):
        self.output = output
        self.folder = output.parent / f"{output.stem}_files"
        self.lines: list[str] = []
        self.count = 0

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def image(self, name: str, draw: Callable[[Path], Any], alt: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.count += 1
        path = self.folder / f"{self.count:02d}-{name}.png"
        draw(path)
        self.add(f"![{alt}]({self.folder.name}/{path.name})", "")


def build_report(dirs: list[str | Path], output: str | Path = "report.md") -> Path:
    """Write one Markdown report of ``dirs`` (runs, studies, ablations, comparisons) to
    ``output``, its images into ``<stem>_files/`` beside it; returns the report's path."""
    if not dirs:
        raise SmileError("report needs at least one output directory")
    sources = [read_recorded(d) for d in dirs]  # everything is read before anything is written
    output = Path(output)
    if output.suffix.lower() != ".md":
        raise SmileError(f"--output {output}: the report is Markdown; give a .md file")
    if output.is_dir():
        raise SmileError(f"--output {output} is a directory; give a .md file")
    report = Report(output)
    report.add("# smile-ray report", "", "Made by `smile-ray report` from: "
               + ", ".join(f"`{s.path}` ({s.kind})" for s in sources) + ".", "")
    for src in sources:
        {"run": _run, "study": _study, "ablation": _ablation, "comparison": _comparison}[src.kind](report, src)
    output.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(report.lines).rstrip("\n") + "\n"
    return atomic_write(output, lambda tmp: Path(tmp).write_text(text))


def _pct(x: Any) -> str:
    return f"{100 * x:.2f}" if isinstance(x, (int, float)) else "n/a"


def _num(x: Any, spec: str = ".4g") -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "n/a"


def _what(config: dict[str, Any]) -> str:
    return f"{config.get('dataset')} ({config.get('backbone')}, {config.get('steps')} steps)"


def _with_run_metrics(src: Recorded, key: Callable[[dict[str, Any]], Any],
                      run_key: Callable[[Path, dict[str, Any]], Any]) -> list[dict[str, Any]]:
    """The rows, each with ``_run`` (its metrics.json, if found) and the IL metrics it lacks."""
    by_key: dict[Any, dict[str, Any]] = {}
    for path, m in src.runs:
        by_key.setdefault(run_key(path, m), m)
    out = []
    for r in src.rows:
        m = by_key.get(key(r))
        row = dict(r, _run=m)
        if m is not None:
            row.update({k: m[k] for k in IL_METRICS if row.get(k) is None and k in m})
        out.append(row)
    return out


def _config_key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True)


def _missing_runs_note(report: Report, src: Recorded, rows: list[dict[str, Any]]) -> bool:
    found = sum(r["_run"] is not None for r in rows)
    if found < len(rows):
        report.add(f"_{found} of {len(rows)} runs' metrics.json found under `{src.path}`; training curves, "
                   "reliability diagrams and interpolation losses use those._", "")
    return found > 0


def _reliability_panels(report: Report, groups: dict[str, list[dict[str, Any]]], title: str, name: str) -> None:
    panels = {label: plots.pool_reliability([m["reliability"] for m in ms])
              for label, ms in groups.items() if ms and all("reliability" in m for m in ms)}
    if not panels:
        return
    shown = dict(list(panels.items())[:MAX_RELIABILITY_PANELS])
    report.add("### Calibration (test split)", "",
               "Reliability diagrams, 15 equal-width confidence bins, the runs of each group pooled "
               "(bin counts added, accuracy and confidence count-weighted)"
               + (f"; the first {len(shown)} of {len(panels)} groups" if len(shown) < len(panels) else "") + ".", "")
    report.image(name, lambda p: plots.plot_reliability(shown, p, title), "reliability diagrams")


# ------------------------------------------------------------------ one section per kind


def _run(report: Report, src: Recorded) -> None:
    m = src.metrics
    config = m["config"]
    title = plots.run_title(config)
    report.add(f"## Run: {title}", "", f"`{src.path}`", "",
               "| metric | value |", "|---|---|",
               f"| validation accuracy (%) | {_pct(m.get('val_acc'))} |",
               f"| test accuracy (%) | {_pct(m.get('test_acc'))} |",
               f"| test ECE (%) | {_pct(m.get('test_ece'))} |",
               f"| test NLL (nats) | {_num(m.get('test_nll'))} |",
               f"| steps | {m.get('steps', 'n/a')} |",
               f"| training time (s) | {_num(m.get('seconds'), '.1f')} |", "")
    if all(k in m for k in IL_METRICS):
        il = m.get("interpolation", {})
        report.add("### Interpolation loss (paper, Eq. 1)", "",
                   f"Mean squared L2 gap over {il.get('pairs', '?')} image pairs x lambda in "
                   f"{il.get('lambdas', '?')}; Label-IL on the logits, Feature-IL on the pooled last feature map "
                   "(docs/method.md).", "",
                   "| images | Label-IL | Feature-IL |", "|---|---|---|",
                   f"| train | {_num(m['label_il_train'])} | {_num(m['feature_il_train'])} |",
                   f"| test | {_num(m['label_il_test'])} | {_num(m['feature_il_test'])} |", "")
    if m.get("history"):
        report.add("### Training curves", "")
        report.image("curves", lambda p: plots.plot_curves({f"seed {config.get('seed')}": [m["history"]]}, p,
                                                           f"Training curves: {title}"), "training curves")
    if "reliability" in m:
        report.add("### Calibration (test split)", "")
        report.image("reliability", lambda p: plots.plot_run_reliability(m, p), "reliability diagram")


def _study(report: Report, src: Recorded) -> None:
    best, rows = src.best, src.rows
    metric, config = best["metric"], best["config"]
    searched = best.get("study", {}).get("searched") or [
        k for k in rows[0] if k not in ("trial_id", "status", metric, *RESULT_KEYS) and not REPLICATE_KEY.fullmatch(k)]
    replicated = f"{metric}_std" in rows[0]  # a replicates: K study: the metrics are means over K seeds
    done = [r for r in rows if r["status"] == "TERMINATED" and r.get(metric) is not None]
    reverse = best.get("mode", "max") == "max"
    title = plots.run_title(config)
    report.add(f"## Study: {title}", "", f"`{src.path}`: {len(rows)} trials, {len(done)} finished; selected on "
               f"{metric} ({best.get('mode', 'max')}), test accuracy never used for selection.", "",
               f"Best trial `{best['trial_id']}`: {metric} {_num(best.get(metric))}, test accuracy "
               f"{_pct(best.get('test_acc'))} % with "
               + ", ".join(f"`{k}={_num(config.get(k)) if isinstance(config.get(k), float) else config.get(k)}`"
                           for k in searched) + ".", "")
    if replicated:
        rep = best.get("replicates", {})
        per_seed = rep.get(metric, {}).get("per_seed", [])
        report.add(f"Each trial ran {len(per_seed)} seeds ({', '.join(map(str, rep.get('seeds', [])))}) and "
                   f"reported their mean: the {metric} and test accuracy below are means ± std over the seeds. "
                   f"The best trial's seeds: {metric} " + ", ".join(_num(v) for v in per_seed) + "; test accuracy "
                   + ", ".join(_pct(v) for v in rep.get("test_acc", {}).get("per_seed", [])) + " %.", "")

    def spread(r: dict[str, Any], key: str, fmt) -> str:
        return fmt(r.get(key)) + (f" ± {fmt(r.get(f'{key}_std'))}" if replicated and r.get(f"{key}_std") is not None
                                  else "")
    ordered = sorted(done, key=lambda r: r[metric], reverse=reverse) + [r for r in rows if r not in done]
    report.add("| trial | " + " | ".join(searched) + f" | {metric} | test acc (%) | status |",
               "|---" * (len(searched) + 4) + "|")
    for r in ordered[:MAX_TRIAL_ROWS]:
        report.add(f"| {r['trial_id']} | " + " | ".join(_num(r.get(k)) if isinstance(r.get(k), float) else str(r.get(k))
                                                     for k in searched)
                   + f" | {spread(r, metric, _num)} | {spread(r, 'test_acc', _pct)} | {r['status']} |")
    if len(ordered) > MAX_TRIAL_ROWS:
        more = len(ordered) - MAX_TRIAL_ROWS
        report.add(f"| ... {more} more trials in trials.parquet | |" + " |" * (len(searched) + 2))
    report.add("")
    existing = sorted(src.path.glob("*_vs_params.png"))
    if existing:
        report.image("params", lambda p: shutil.copyfile(existing[0], p), f"{metric} against each searched parameter")
    trial_runs = {}
    for path, m in src.runs:
        trial = next((r["trial_id"] for r in rows if any(r["trial_id"] in part for part in path.parts)), None)
        if trial is not None:
            trial_runs.setdefault(trial, m)
    if trial_runs:
        groups = {t: [m["history"]] for t, m in trial_runs.items() if m.get("history")}
        best_label = best["trial_id"] if best["trial_id"] in groups else None
        if best_label:
            groups[f"best trial {best_label}"] = groups.pop(best_label)
            best_label = f"best trial {best_label}"
        report.add("### Training curves", "")
        report.image("curves", lambda p: plots.plot_curves(groups, p, f"Training curves of {len(groups)} trials: "
                                                           f"{title}", highlight=best_label), "training curves")
        best_run = trial_runs.get(best["trial_id"])
        if best_run is not None and "reliability" in best_run:
            report.add("### Calibration of the best trial (test split)", "")
            report.image("reliability", lambda p: plots.plot_run_reliability(best_run, p), "reliability diagram")
        il_rows = [{"trial": t, **m} for t, m in trial_runs.items()]
        table = il_table(sorted(il_rows, key=lambda r: r["trial"] != best["trial_id"]), ["trial"])
        if table:
            report.add("### Interpolation loss (paper, Eq. 1), per trial", "", table)
    else:
        report.add(f"_No trial metrics.json under `{src.path}`: no curves or reliability diagrams._", "")
    if "samples_per_class" in searched and len({r["samples_per_class"] for r in done}) > 1:
        sized = [{**r, "study": src.path.name} for r in done if r.get("test_acc") is not None]
        report.add("### Accuracy against training-set size", "")
        report.image("size", lambda p: plots.plot_accuracy_vs_size(
            sized, "study", p, f"Test accuracy against data size: {title}, {len(sized)} trials"), "accuracy vs size")


def _configs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [json.loads(r["config"]) if isinstance(r["config"], str) else r["config"] for r in rows]


def _ablation(report: Report, src: Recorded) -> None:
    rows = _with_run_metrics(src, lambda r: r["config"], lambda p, m: _config_key(m["config"]))
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    base = _configs(rows)[0]
    seeds = len({r["seed"] for r in rows})
    sizes = sorted({r["samples_per_class"] for r in rows})
    what = f"{base.get('method')} on {_what(base)}, {seeds} seeds"
    report.add(f"## {ablation_title(base)}", "",
               f"`{src.path}`: {len(rows)} runs. Reference: `{arms[0]}`. {ABLATION_LEGEND}", "",
               ablation_table(rows, arms, arms[0]))
    report.image("ablation", lambda p: plots.plot_ablation(rows, arms, p, f"Ablation of {what}: test accuracy per arm"),
                 "paired differences per arm")
    label = (lambda r: r["arm"]) if len(sizes) == 1 else (lambda r: f"{r['arm']}, {r['samples_per_class']}/class")
    _per_group(report, src, rows, "arm", ["samples_per_class", "arm"], label, what,
               f"Test accuracy against data size, per arm: {what}" if len(sizes) > 1 else None)


def _per_group(report: Report, src: Recorded, rows: list[dict[str, Any]], group: str, il_keys: list[str], label,
               what: str, size_title: str | None) -> None:
    """An ablation's or a comparison's sections per arm or method (``group``): accuracy
    against data size (with ``size_title``), the interpolation losses (by ``il_keys``),
    then the training curves and reliability diagrams of the runs found, by ``label``."""
    if size_title:
        report.add("### Accuracy against training-set size", "")
        report.image("size", lambda p: plots.plot_accuracy_vs_size(rows, group, p, size_title), "accuracy vs size")
    table = il_table(rows, il_keys)
    if table:
        report.add("### Interpolation loss (paper, Eq. 1)", "", "Mean ± std over seeds; docs/method.md.", "", table)
    if _missing_runs_note(report, src, rows):
        _curves_and_reliability(report, rows, label, f"per {group}: {what}")


def _curves_and_reliability(report: Report, rows: list[dict[str, Any]], label, what: str) -> None:
    """Training curves and reliability panels of the rows' runs, grouped by ``label(row)``."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["_run"] is not None:
            groups.setdefault(label(r), []).append(r["_run"])
    report.add("### Training curves", "")
    report.image("curves", lambda p: plots.plot_curves({k: [m["history"] for m in v] for k, v in groups.items()},
                                                       p, f"Training curves {what}"), "training curves")
    _reliability_panels(report, groups, f"Reliability {what}", "reliability")


def _comparison(report: Report, src: Recorded) -> None:
    rows = _with_run_metrics(src, lambda r: r["config"], lambda p, m: _config_key(m["config"]))
    configs = _configs(rows)
    for r, c in zip(rows, configs):
        r.setdefault("samples_per_class", c.get("samples_per_class"))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    # the settings' column order and the reference as compare recorded them; without its
    # state file, the rows' order (compare writes them column by column) and the same rule
    columns = src.state.get("columns") or list(dict.fromkeys(r["setting"] for r in rows))
    reference = src.state.get("reference") or reference_method(methods)
    seeds = len({r["seed"] for r in rows})
    what = f"{_what(configs[0])}, {seeds} seeds"
    varied = ["weights"] if len({c.get("weights") for c in configs}) > 1 else []
    report.add(f"## {comparison_title(configs[0], varied)}", "",
               f"`{src.path}`: {len(rows)} finished runs. Reference: `{reference}`. {COMPARE_LEGEND}", "",
               compare_table(rows, methods, columns, reference))
    report.image("compare", lambda p: plots.plot_compare(rows, methods, [c for c in columns if any(
        r["setting"] == c for r in rows)], p, f"Test accuracy on {what}"), "test accuracy per method and column")
    series = size_differences(rows, reference)
    if series:
        report.add(f"### Difference to {reference} against training-set size (the paper's Fig. 1)", "")
        report.image("difference", lambda p: plots.plot_difference_vs_size(
            series, reference, p, f"Paired difference to {reference} against data size: {what}"),
            "difference to the reference against size")
        report.add(size_difference_table(series, reference))
    # Accuracy against size: only where the columns differ in data size and each size is one column.
    size_of = {r["setting"]: r["samples_per_class"] for r in rows}
    sized = len(set(size_of.values())) > 1 and len(set(size_of.values())) == len(size_of)
    label = (lambda r: r["method"]) if len(columns) == 1 else (lambda r: f"{r['method']}, {r['setting']}")
    _per_group(report, src, rows, "method", ["setting", "method"], label, what,
               f"Test accuracy against data size: {what}" if sized else None)
