"""Search-space and ablation-definition files, validated before anything starts.

A space file is YAML::

    base:                      # config keys (any), or a path to a best.json / metrics.json
      method: smile
      steps: 300
    metric: val_acc            # what tuning optimises: a validation metric, never test
    mode: max                  # max | min
    num_samples: 24            # trials
    search: hyperopt           # hyperopt | random | grid
    max_concurrent: 2          # trials at a time
    scheduler: none            # none | asha (early stopping over evaluation steps)
    resources: {cpus: 1, gpus: 0, workers: 1}   # per trial; workers > 1 = Ray Train per trial
    seed: 0                    # seed of the search algorithm
    replicates: 1              # seeds per trial (base.seed, base.seed + 1, ...): the trial
                               # reports their mean validation curve; see trainable.py
    space:                     # flat config names -> distributions
      mixup_alpha: {loguniform: [0.05, 2.0]}
      ema_decay: {uniform: [0.99, 0.9999]}
      feature_mixup: {choice: [true, false]}

Distributions: ``uniform: [low, high]``, ``loguniform: [low, high]`` (low > 0),
``quniform: [low, high, q]``, ``randint: [low, high]`` (high exclusive),
``choice: [v, ...]``, ``grid: [v, ...]`` (every value; only with ``search: random`` or
``grid``).

An ablation-definitions file (``ablations/``) has ``base``, ``seeds``,
``samples_per_class`` (one value or a list), ``max_concurrent``, ``resources`` (as
above, for every run), ``components`` (name -> the config overrides that turn it off)
and an optional ``tune_space`` (as ``space`` above, for ``--tune-budget``).

A comparison-settings file (``search_spaces/compare/``) has ``base`` (no ``method``:
``--methods`` names them), ``columns`` (``{samples_per_class: [2, 5]}``, a column per
value, or ``{name: {overrides}}``), ``seeds``, ``max_concurrent``, ``resources`` and
optional ``tune_space`` (method -> space, for ``--tune-budget``; the ablation file's
key, keyed by method).

This module is plain Python: it knows the file formats, not Ray.
"""
from __future__ import annotations

import math

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smile_ray.config import KEYS, Config, check_int, find_shipped, make_config, read_yaml, resolve_config
from smile_ray.errors import SmileError
from smile_ray.metrics import EVAL_METRICS

DISTRIBUTIONS = ("uniform", "loguniform", "quniform", "randint", "choice", "grid")
SEARCHES = ("hyperopt", "random", "grid")
SCHEDULERS = ("none", "asha")
TOP_LEVEL = ("base", "metric", "mode", "num_samples", "search", "max_concurrent", "scheduler", "resources", "seed",
             "replicates", "space")
RESOURCES = ("cpus", "gpus", "workers")


@dataclass(frozen=True)
class Param:
    name: str
    kind: str
    args: tuple

    def contains(self, value: Any) -> bool:
        if self.kind in ("choice", "grid"):
            return value in self.args
        low, high = self.args[0], self.args[1]
        return low <= value < high if self.kind == "randint" else low <= value <= high


@dataclass(frozen=True)
class Resources:
    """What each trial (or ablation run) holds: ``workers`` > 1 runs it on that many Ray
    Train workers, which share the trial's ``cpus`` and take one of its ``gpus`` each."""

    cpus: int = 1
    gpus: float = 0  # a fraction (e.g. 0.25) lets small one-process trials share a GPU
    workers: int = 1

    def summary(self) -> dict[str, float]:
        return {"resources_cpus": self.cpus, "resources_gpus": self.gpus, "resources_workers": self.workers}

    def bundles(self) -> list[dict[str, float]]:
        """What each process of a trial asks Ray for (Ray's resource names): the trial
        itself, or with ``workers`` > 1 each Ray Train worker (the trial only drives them)."""
        if self.workers == 1:
            return [{"CPU": self.cpus, "GPU": self.gpus}]
        return [{"CPU": self.cpus / self.workers, "GPU": 1 if self.gpus else 0}]


@dataclass(frozen=True)
class Study:
    path: Path
    base: Config
    metric: str
    mode: str
    num_samples: int
    search: str
    max_concurrent: int
    scheduler: str
    resources: Resources
    seed: int
    space: tuple[Param, ...] = field(default_factory=tuple)
    replicates: int = 1  # seeds per trial: base.seed, base.seed + 1, ...; the trial reports their mean

    @property
    def replicate_seeds(self) -> list[int]:
        return [self.base.seed + r for r in range(self.replicates)]

    @property
    def searched(self) -> list[str]:
        return [p.name for p in self.space]

    def summary(self) -> dict[str, Any]:
        return {
            "metric": self.metric, "mode": self.mode, "num_samples": self.num_samples, "search": self.search,
            "max_concurrent": self.max_concurrent, "scheduler": self.scheduler, "seed": self.seed,
            "replicates": self.replicates, **self.resources.summary(),
        }


def parse_resources(path: Path, raw: Any, base: Config) -> Resources:
    raw = raw or {}
    if not isinstance(raw, dict):
        raise SmileError(f"{path}: resources must be a mapping of {', '.join(RESOURCES)}")
    bad = [k for k in raw if k not in RESOURCES]
    if bad:
        raise SmileError(f"{path}: resources: unknown key {bad[0]!r} (expected: {', '.join(RESOURCES)})")
    values = {k: check_int(v, f"{path}: resources.{k}", 1) for k, v in raw.items() if k != "gpus"}
    res = Resources(**values, gpus=check_gpus(raw.get("gpus", 0), values.get("workers", 1), f"{path}: resources.gpus"))
    if base.batch_size % res.workers:
        raise SmileError(f"{path}: batch_size={base.batch_size} does not split evenly over resources.workers={res.workers}")
    return res


def check_gpus(value: Any, workers: int, where: str) -> float:
    """GPUs a trial may hold: what it can use. A one-process trial (``workers: 1``, or each
    replicate) trains on one device, so it takes 0, a fraction (GPU sharing, as Ray Tune
    offers it: ``0.25`` runs four such trials on one GPU) or 1; a Ray Train trial takes one
    whole GPU per worker (``gpus == workers``) or none."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise SmileError(f"{where}={value!r} must be a number >= 0")
    if workers > 1:
        if value not in (0, workers):
            raise SmileError(f"{where}={value} with workers={workers}: each Ray Train worker takes one whole GPU "
                             f"(gpus: {workers}) or none (gpus: 0)")
        return int(value)
    if value > 1:
        raise SmileError(f"{where}={value:g} with workers=1: a one-process trial trains on one GPU and could not "
                         "use the others (for data parallelism set workers to the number of GPUs)")
    return int(value) if float(value).is_integer() else float(value)


def parse_base(path: Path, raw: Any, overrides: dict[str, Any] | None) -> Config:
    """A file's ``base`` section (config keys, or a path to a config/best.json/metrics.json
    relative to the file) with ``--set`` overrides applied."""
    return resolve_config(raw or {}, overrides or {}, where=f"{path}: base", relative_to=path.parent)


def _number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise SmileError(f"{where}: {value!r} is not a number") from None
    return float(value)


def parse_param(path: Path, name: Any, spec: Any, base: Config, section: str = "space") -> Param:
    where = f"{path}: {section}.{name}"
    if name not in KEYS:
        raise SmileError(f"{path}: {section}: {name!r} is not a config key")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SmileError(f"{where}: expected one distribution, e.g. {{uniform: [low, high]}}")
    kind, args = next(iter(spec.items()))
    if kind not in DISTRIBUTIONS:
        raise SmileError(f"{where}: unknown distribution {kind!r} (choose from: {', '.join(DISTRIBUTIONS)})")
    if not isinstance(args, list) or not args:
        raise SmileError(f"{where}.{kind}: expected a list of values")
    if kind in ("choice", "grid"):
        values = tuple(args)
        for v in values:  # every value must be a valid setting of the key
            make_config({**base.to_dict(), name: v}, where=where)
        return Param(name, kind, values)
    need = 3 if kind == "quniform" else 2
    if len(args) != need:
        raise SmileError(f"{where}.{kind}: expected {need} numbers, got {len(args)}")
    nums = tuple(_number(f"{where}.{kind}", a) for a in args)
    low, high = nums[0], nums[1]
    if low >= high:
        raise SmileError(f"{where}.{kind}: low {args[0]} must be below high {args[1]}")
    if kind == "loguniform" and low <= 0:
        raise SmileError(f"{where}.loguniform: low {args[0]} must be > 0")
    if kind == "quniform" and nums[2] <= 0:
        raise SmileError(f"{where}.quniform: q {args[2]} must be > 0")
    if kind == "randint":
        nums = (int(low), int(high))
    for v in (nums[0], nums[1] - 1 if kind == "randint" else nums[1]):  # the range's ends are valid values
        make_config({**base.to_dict(), name: v}, where=where)
    return Param(name, kind, nums)


class Sections:
    """A file's top-level mapping, restricted to ``allowed`` keys, with the one parser of
    each section the three formats share (``base``, ``seeds``, ``max_concurrent``,
    ``resources``, a tune space): a section means the same in every file, and a bad one
    is refused with the same line whichever file holds it."""

    def __init__(self, path: Path, raw: Any, allowed: tuple[str, ...], required: str):
        if not isinstance(raw, dict):
            raise SmileError(f"{path}: expected a mapping with a {required!r} section")
        unknown = [k for k in raw if k not in allowed]
        if unknown:
            raise SmileError(f"{path}: unknown key {unknown[0]!r} (expected: {', '.join(allowed)})")
        self.path, self.raw = path, raw

    @classmethod
    def read(cls, path: Path, allowed: tuple[str, ...], required: str) -> "Sections":
        return cls(path, read_yaml(path), allowed, required)

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)

    def base(self, overrides: dict[str, Any] | None) -> Config:
        return parse_base(self.path, self.raw.get("base"), overrides)

    def count(self, key: str, default: int, minimum: int, given: int | None = None, why: str = "") -> int:
        """An integer section (``seeds``, ``num_samples``, ``max_concurrent``, ...); ``given``
        (its ``--key`` option) replaces the file's value."""
        if given is not None:
            return check_int(given, f"--{key.replace('_', '-')}", minimum, why)
        return check_int(self.raw.get(key, default), f"{self.path}: {key}", minimum, why)

    def resources(self, base: Config) -> Resources:
        return parse_resources(self.path, self.raw.get("resources"), base)

    def space(self, key: str, base: Config, *, required: bool = False) -> dict[str, Any]:
        return parse_space(self.path, key, self.raw.get(key), base, required=required)


def parse_space(path: Path, section: str, raw: Any, base: Config, *, required: bool = False) -> dict[str, Any]:
    """A tune space (config key -> distribution), each parameter checked against ``base``;
    returned as written, for :func:`parse_study` to read once more around the config it
    will search (an arm's or a method's, in ``ablate`` and ``compare``)."""
    raw = raw or {}
    if not isinstance(raw, dict) or (required and not raw):
        raise SmileError(f"{path}: {section} must map config keys to distributions")
    for name, spec in raw.items():
        parse_param(path, name, spec, base, section=section)
    return dict(raw)


def load_study(path: str | Path, overrides: dict[str, Any] | None = None, num_samples: int | None = None) -> Study:
    """Read and validate a space file (a path, or the name of a shipped one);
    ``overrides`` (``--set``) change the base config."""
    path = find_shipped(path, "search_spaces")
    return parse_study(path, read_yaml(path), overrides, num_samples)


def parse_study(path: Path, raw: Any, overrides: dict[str, Any] | None = None,
                num_samples: int | None = None) -> Study:
    """A space file's mapping, validated (``path`` names it in messages and is the
    study's record): what :func:`load_study` reads, or a study built in memory (an arm's
    or a method's tuning inside ``ablate`` and ``compare``)."""
    sections = Sections(path, raw, TOP_LEVEL, "space")
    base = sections.base(overrides)

    metric = sections.get("metric", "val_acc")
    if metric == "test_acc" or str(metric).startswith("test"):
        raise SmileError(f"{path}: metric {metric!r}: tuning selects on validation metrics only ({', '.join(EVAL_METRICS)})")
    if metric not in EVAL_METRICS:
        raise SmileError(f"{path}: metric {metric!r} is not reported by the trainer (choose from: {', '.join(EVAL_METRICS)})")
    mode = sections.get("mode", EVAL_METRICS[metric])
    if mode not in ("max", "min"):
        raise SmileError(f"{path}: mode {mode!r} must be max or min")

    n = sections.count("num_samples", 10, 1, num_samples)
    search = sections.get("search", "hyperopt")
    if search not in SEARCHES:
        raise SmileError(f"{path}: search {search!r} (choose from: {', '.join(SEARCHES)})")
    scheduler = str(sections.get("scheduler", "none")).lower()
    if scheduler not in SCHEDULERS:
        raise SmileError(f"{path}: scheduler {scheduler!r} (choose from: {', '.join(SCHEDULERS)})")
    concurrent = sections.count("max_concurrent", 2, 1)
    seed = sections.count("seed", 0, 0)
    resources = sections.resources(base)
    replicates = sections.count("replicates", 1, 1)
    if replicates > 1 and resources.workers > 1:
        raise SmileError(f"{path}: replicates={replicates} with resources.workers={resources.workers}: "
                         "replicated trials run in one process per seed; use workers: 1")

    space_raw = sections.space("space", base, required=True)
    space = tuple(parse_param(path, name, spec, base) for name, spec in space_raw.items())
    from smile_ray.methods import check_keys_read

    check_keys_read(overrides or {}, [base] + [make_config({**base.to_dict(), p.name: v}) for p in space
                                               if p.kind in ("choice", "grid") for v in p.args])
    if search == "hyperopt" and any(p.kind == "grid" for p in space):
        raise SmileError(f"{path}: grid values need search: grid or random (hyperopt samples)")
    if replicates > 1 and "seed" in space_raw:
        raise SmileError(f"{path}: space.seed with replicates={replicates}: replicates choose the seeds "
                         "(base.seed, base.seed + 1, ...)")
    return Study(path, base, metric, mode, n, search, concurrent, scheduler, resources, seed, space, replicates)


def check_tune_budget(budget: int, searchable: bool, needs: str) -> None:
    """``--tune-budget`` is a count, and needs a space to search (``needs`` says which)."""
    if budget < 0:
        raise SmileError(f"--tune-budget={budget} must be >= 0")
    if budget and not searchable:
        raise SmileError(f"--tune-budget needs {needs}")


def tuning_study(path: Path, config: dict[str, Any], space: dict[str, Any], budget: int, resources: Resources,
                 max_concurrent: int) -> tuple[Study, dict[str, Any]]:
    """The HyperOpt study ``ablate`` and ``compare`` run for one arm or method with
    ``--tune-budget``: ``budget`` trials on ``val_acc`` over ``space`` around ``config``,
    with the file's ``resources``; also the mapping it was parsed from (its record)."""
    raw = {"base": config, "metric": "val_acc", "num_samples": budget, "max_concurrent": max_concurrent,
           "space": space, "resources": {"cpus": resources.cpus, "gpus": resources.gpus, "workers": resources.workers}}
    return parse_study(path, raw), raw


ABLATION_TOP_LEVEL = ("base", "seeds", "samples_per_class", "max_concurrent", "resources", "components", "tune_space")


@dataclass(frozen=True)
class Definitions:
    """A validated ablation-definitions file."""

    path: Path
    base: Config
    seeds: int
    samples: tuple[int, ...]
    max_concurrent: int
    resources: Resources
    components: dict[str, dict[str, Any]]
    tune_space: dict[str, Any]


def load_definitions(path: str | Path, base_file: str | Path | None = None, overrides: dict[str, Any] | None = None,
                     seeds: int | None = None) -> Definitions:
    """Read and validate an ablation-definitions file. ``base_file`` replaces its base;
    ``overrides`` (``--set``) apply to every run, a ``samples_per_class`` override
    replacing the file's grid; the run seeds are ``0..seeds-1``, so ``--set seed`` is
    refused."""
    path = find_shipped(path, "ablations")
    sections = Sections.read(path, ABLATION_TOP_LEVEL, "components")
    overrides = dict(overrides or {})
    if "seed" in overrides:
        raise SmileError("--set seed: an ablation runs seeds 0..K-1 in every arm; choose K with --seeds")
    spc_override = overrides.pop("samples_per_class", None)
    base = resolve_config(base_file, overrides) if base_file is not None else sections.base(overrides)

    components = sections.get("components")
    if not isinstance(components, dict) or not components:
        raise SmileError(f"{path}: components must map names to the overrides that turn them off")
    for name, off in components.items():
        if not isinstance(off, dict) or not off:
            raise SmileError(f"{path}: components.{name} must be a mapping of config overrides")
        make_config({**base.to_dict(), **off}, where=f"{path}: components.{name}")
    from smile_ray.methods import check_keys_read

    # the base is shared by every arm: a knob is fine where some arm reads it
    check_keys_read(overrides, [base] + [make_config({**base.to_dict(), **off}) for off in components.values()])

    n = sections.count("seeds", 5, 2, seeds, "a paired test needs at least 2 seeds")
    if spc_override is not None:
        samples = [spc_override]
        where = "--set"
    else:
        samples = sections.get("samples_per_class", [base.samples_per_class])
        samples = samples if isinstance(samples, list) else [samples]
        where = f"{path}: samples_per_class"
    samples = [make_config({**base.to_dict(), "samples_per_class": s}, where=where).samples_per_class for s in samples]
    return Definitions(path, base, n, tuple(samples), sections.count("max_concurrent", 2, 1), sections.resources(base),
                       dict(components), sections.space("tune_space", base))


COMPARE_TOP_LEVEL = ("base", "columns", "seeds", "max_concurrent", "resources", "tune_space")


@dataclass(frozen=True)
class Settings:
    """A validated comparison-settings file (``smile-ray compare --settings``)."""

    path: Path
    base: Config
    columns: dict[str, dict[str, Any]]  # column name -> config overrides
    seeds: int
    max_concurrent: int
    resources: Resources
    tune_space: dict[str, dict[str, Any]]  # method -> {key: distribution}


def parse_columns(path: Path, raw: Any) -> dict[str, dict[str, Any]]:
    """``{key: [v1, v2]}`` (a column per value, named ``key=v``) or ``{name: {overrides}}``."""
    if isinstance(raw, dict) and len(raw) == 1 and isinstance(next(iter(raw.values())), list):
        key, values = next(iter(raw.items()))
        if not values:
            raise SmileError(f"{path}: columns.{key}: expected a non-empty list of values")
        return {f"{key}={v}": {key: v} for v in values}
    if isinstance(raw, dict) and raw and all(isinstance(v, dict) for v in raw.values()):
        return {str(k): dict(v) for k, v in raw.items()}
    raise SmileError(f"{path}: columns must be {{key: [values]}} (e.g. samples_per_class: [2, 5]) "
                     "or a mapping of column names to config overrides")


def load_settings(path: str | Path, methods: list[str], overrides: dict[str, Any] | None = None,
                  seeds: int | None = None) -> Settings:
    """Read and validate a comparison-settings file (a path, or a shipped one by name)
    for ``methods``. ``overrides`` (``--set``) apply to every run; seeds are 0..K-1, so
    ``--set seed`` and ``--set method`` are refused, and a method's own knob must belong
    to one of ``methods``."""
    from smile_ray.methods import check_keys_read, method_class

    path = find_shipped(path, "compare")
    sections = Sections.read(path, COMPARE_TOP_LEVEL, "columns")
    overrides = dict(overrides or {})
    base_raw = sections.get("base") if isinstance(sections.get("base"), dict) else {}
    for key, why in (("seed", "a comparison runs seeds 0..K-1 for every method; choose K with --seeds"),
                     ("method", "a comparison takes its methods from --methods")):
        if key in overrides:
            raise SmileError(f"--set {key}: {why}")
        if key in base_raw:
            raise SmileError(f"{path}: base.{key}: {why}")
    base = sections.base(overrides)
    columns = parse_columns(path, sections.get("columns"))
    configs = {}
    for m in methods:
        for name, col in columns.items():
            configs[m, name] = make_config({**base.to_dict(), **col, "method": m}, where=f"{path}: columns.{name}")
    for key in overrides:  # a column's value overrides the base, --set included
        setters = [name for name, col in columns.items() if key in col]
        if setters:
            raise SmileError(f"--set {key}: the columns of {path} set {key} ({', '.join(setters)}), and a run takes "
                             "its column's value; change it in the file's columns")
    check_keys_read(overrides, configs.values())  # a knob of a method not in the run would do nothing
    n = sections.count("seeds", 5, 2, seeds, "a paired comparison needs at least 2 seeds")
    spaces = sections.get("tune_space") or {}
    if not isinstance(spaces, dict) or not all(isinstance(v, dict) for v in spaces.values()):
        raise SmileError(f"{path}: tune_space must map method names to {{key: distribution}}")
    for m in spaces:
        method_class(m)  # an unknown method name is one line
    per_method = {m: parse_space(path, f"tune_space.{m}", space, base.replace(method=m)) for m, space in spaces.items()}
    return Settings(path, base, columns, n, sections.count("max_concurrent", 2, 1), sections.resources(base),
                    per_method)
