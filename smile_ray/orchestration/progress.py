"""What a person watching ``tune`` or ``ablate`` sees: one row per trial as it ends,
sized for an 80-120 column terminal.

Ray Tune's own live table repeats every trial with every parameter, metric and
bookkeeping column at every update (up to 266 columns and 1,470 lines for a
30-trial study here), and names an ablation's runs ``run 4``. This table prints a
header once and then a row when a trial finishes, fails or is stopped early: the
counts done, the time since the start, the trial's own columns (a study's searched
parameters, or an ablation run's arm, data size and seed), its metrics and, for a
study, the best value so far. The complete record is written at the end
(``trials.parquet`` / ``ablation.parquet``).
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, TextIO

from ray import tune

# (header, value for a trial: Tune's Trial, with .config and .last_result)
Column = tuple[str, Callable[[Any], Any]]


def _format(value: Any, width: int, digits: int | None = None) -> str:
    """Right-aligned cell: metrics with ``digits`` decimals, other floats with 3 significant digits."""
    if value is None:
        text = "-"
    elif isinstance(value, float) and digits is not None:
        text = f"{value:.{digits}f}"
    elif isinstance(value, float):
        text = f"{value:.3g}"
    else:
        text = str(value)
    return text.rjust(width)


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class TrialTable(tune.Callback):
    """Prints one row per ended trial; ``best`` names the metric to track (``(name, mode)``)."""

    def __init__(self, columns: list[Column], metrics: list[str], expected: int, *,
                 best: tuple[str, str] | None = None, stream: TextIO | None = None,
                 title: str | None = None):
        self.columns = columns
        self.metrics = metrics
        self.expected = expected
        self.best_metric = best
        self.stream = stream
        self.title = title
        self.started = time.perf_counter()
        self.header_printed = False
        headers = ["done", "elapsed"] + [h for h, _ in columns] + metrics + (["best"] if best else []) + ["s/run"]
        self.widths = [max(len(h), 6 if h in metrics or h == "best" else 8 if h == "trial" else 1) for h in headers]
        self.widths[0] = max(4, 2 * len(str(expected)) + 1)
        self.headers = headers

    def _out(self, line: str) -> None:
        stream = self.stream or sys.stderr
        stream.write(line + "\n")
        stream.flush()

    def _row(self, values: list[Any], note: str = "") -> None:
        if not self.header_printed:
            if self.title:
                self._out(self.title)
            self._out(" ".join(h.rjust(w) for h, w in zip(self.headers, self.widths)))
            self.header_printed = True
        first_metric = 2 + len(self.columns)
        cells = [_format(v, w, 1 if i == len(values) - 1 else 4 if i >= first_metric else None)
                 for i, (v, w) in enumerate(zip(values, self.widths))]
        self._out(" ".join(cells) + (f"  {note}" if note else ""))

    def _trial_row(self, trial, trials: list, note: str = "") -> None:
        # Counted from Tune's trial list, not from this object: a restored study's table
        # (Tune pickles its callbacks) then counts the trials finished before the resume too.
        ended = [t for t in trials if t is not trial and t.status in ("TERMINATED", "ERROR")] + [trial]
        result = trial.last_result or {}
        values: list[Any] = [f"{len(ended)}/{self.expected}", _duration(time.perf_counter() - self.started)]
        values += [fn(trial) for _, fn in self.columns]
        values += [result.get(m) for m in self.metrics]
        if self.best_metric:
            name, mode = self.best_metric
            # as the study's best.json: trials that ran to the end (ASHA's stopped ones have no test_acc)
            finished = [t.last_result for t in ended if t.status != "ERROR" and "test_acc" in (t.last_result or {})]
            scores = [r[name] for r in finished if r.get(name) is not None]
            values.append((max if mode == "max" else min)(scores) if scores else None)
        values.append(result.get("seconds"))
        self._row(values, note)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        result = trial.last_result or {}
        self._trial_row(trial, trials, "" if "test_acc" in result else "stopped early")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        # trial.path: the trial's directory in the experiment's storage (local_path is Ray's staging copy)
        self._trial_row(trial, trials, f"FAILED: see {trial.path}")

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "stream": None}  # Tune pickles its callbacks with the experiment

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.started, self.header_printed = time.perf_counter(), False


def study_progress(searched: list[str], metric: str, mode: str, expected: int) -> TrialTable:
    """A study's table: trial id (as in trials.parquet and best.json), searched parameters,
    the metric and the best so far. (Test accuracy is left out on purpose: a study selects
    on validation alone.)"""
    columns: list[Column] = [("trial", lambda t: str(t.trial_id))]
    columns += [(p, (lambda t, p=p: (t.config or {}).get(p))) for p in searched]
    return TrialTable(columns, [metric], expected, best=(metric, mode))


def runs_progress(runs: list[dict[str, Any]], tags: list[str], expected: int) -> TrialTable:
    """The table of a list of runs (an ablation's, a comparison's): each run's ``tags``
    (arm or method, data size or setting, seed) with its accuracies."""
    def tag(name):
        return lambda t: runs[t.config["run"]]["tags"][name] if "run" in (t.config or {}) else None

    table = TrialTable([(name, tag(name)) for name in tags], ["val_acc", "test_acc"], expected)
    for i, name in enumerate(tags):  # text columns as wide as their longest value
        table.widths[2 + i] = max(table.widths[2 + i], *(len(str(r["tags"][name])) for r in runs))
    return table


def ablation_progress(runs: list[dict[str, Any]], expected: int) -> TrialTable:
    """An ablation's table: each run's arm, data size and seed, with its accuracies."""
    return runs_progress(runs, ["arm", "samples_per_class", "seed"], expected)
