"""Search-space files: what a tuning study runs, validated before anything starts.

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
    space:                     # flat config names -> distributions
      mixup_alpha: {loguniform: [0.05, 2.0]}
      ema_decay: {uniform: [0.99, 0.9999]}
      feature_mixup: {choice: [true, false]}

Distributions: ``uniform: [low, high]``, ``loguniform: [low, high]`` (low > 0),
``quniform: [low, high, q]``, ``randint: [low, high]`` (high exclusive),
``choice: [v, ...]``, ``grid: [v, ...]`` (every value; only with ``search: random`` or
``grid``). This module is plain Python: it knows the file format, not Ray.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smile_ray.config import KEYS, Config, load_config_values, make_config, read_yaml
from smile_ray.errors import SmileError

DISTRIBUTIONS = ("uniform", "loguniform", "quniform", "randint", "choice", "grid")
SEARCHES = ("hyperopt", "random", "grid")
SCHEDULERS = ("none", "asha")
# Metrics a trial reports at every evaluation, with the direction that is better.
TUNABLE_METRICS = {"val_acc": "max", "val_ece": "min", "train_loss": "min"}
TOP_LEVEL = ("base", "metric", "mode", "num_samples", "search", "max_concurrent", "scheduler", "resources", "seed", "space")
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
class Study:
    path: Path
    base: Config
    metric: str
    mode: str
    num_samples: int
    search: str
    max_concurrent: int
    scheduler: str
    resources: dict[str, int]
    seed: int
    space: tuple[Param, ...] = field(default_factory=tuple)

    @property
    def searched(self) -> list[str]:
        return [p.name for p in self.space]

    def summary(self) -> dict[str, Any]:
        return {
            "metric": self.metric, "mode": self.mode, "num_samples": self.num_samples, "search": self.search,
            "max_concurrent": self.max_concurrent, "scheduler": self.scheduler, "seed": self.seed,
            **{f"resources_{k}": v for k, v in self.resources.items()},
        }


def _number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise SmileError(f"{where}: {value!r} is not a number") from None
    return float(value)


def parse_param(path: Path, name: Any, spec: Any, base: Config) -> Param:
    where = f"{path}: space.{name}"
    if name not in KEYS:
        raise SmileError(f"{path}: space: {name!r} is not a config key")
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


def read_sections(path: Path, allowed: tuple[str, ...], required: str) -> dict[str, Any]:
    """A YAML file's top-level mapping, restricted to ``allowed`` keys."""
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise SmileError(f"{path}: expected a mapping with a {required!r} section")
    unknown = [k for k in raw if k not in allowed]
    if unknown:
        raise SmileError(f"{path}: unknown key {unknown[0]!r} (expected: {', '.join(allowed)})")
    return raw


def load_study(path: str | Path, overrides: dict[str, Any] | None = None, num_samples: int | None = None) -> Study:
    """Read and validate a space file; ``overrides`` (``--set``) change the base config."""
    path = Path(path)
    raw = read_sections(path, TOP_LEVEL, "space")
    base_raw = raw.get("base") or {}
    if isinstance(base_raw, str):
        base_file = (path.parent / base_raw) if not Path(base_raw).is_absolute() else Path(base_raw)
        base_raw = load_config_values(base_file)
    if not isinstance(base_raw, dict):
        raise SmileError(f"{path}: base must be a mapping of config keys or a file path")
    base = make_config(base_raw, where=f"{path}: base")
    if overrides:
        base = make_config({**base.to_dict(), **overrides}, where="--set")

    metric = raw.get("metric", "val_acc")
    if metric == "test_acc" or str(metric).startswith("test"):
        raise SmileError(f"{path}: metric {metric!r}: tuning selects on validation metrics only ({', '.join(TUNABLE_METRICS)})")
    if metric not in TUNABLE_METRICS:
        raise SmileError(f"{path}: metric {metric!r} is not reported by the trainer (choose from: {', '.join(TUNABLE_METRICS)})")
    mode = raw.get("mode", TUNABLE_METRICS[metric])
    if mode not in ("max", "min"):
        raise SmileError(f"{path}: mode {mode!r} must be max or min")

    n = num_samples if num_samples is not None else raw.get("num_samples", 10)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise SmileError(f"{'--num-samples' if num_samples is not None else str(path) + ': num_samples'}={n!r} must be an integer >= 1")
    search = raw.get("search", "hyperopt")
    if search not in SEARCHES:
        raise SmileError(f"{path}: search {search!r} (choose from: {', '.join(SEARCHES)})")
    scheduler = str(raw.get("scheduler", "none")).lower()
    if scheduler not in SCHEDULERS:
        raise SmileError(f"{path}: scheduler {scheduler!r} (choose from: {', '.join(SCHEDULERS)})")
    concurrent = raw.get("max_concurrent", 2)
    if isinstance(concurrent, bool) or not isinstance(concurrent, int) or concurrent < 1:
        raise SmileError(f"{path}: max_concurrent={concurrent!r} must be an integer >= 1")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SmileError(f"{path}: seed={seed!r} must be an integer >= 0")

    res_raw = raw.get("resources") or {}
    if not isinstance(res_raw, dict):
        raise SmileError(f"{path}: resources must be a mapping of {', '.join(RESOURCES)}")
    bad = [k for k in res_raw if k not in RESOURCES]
    if bad:
        raise SmileError(f"{path}: resources: unknown key {bad[0]!r} (expected: {', '.join(RESOURCES)})")
    resources = {"cpus": 1, "gpus": 0, "workers": 1, **res_raw}
    for k, v in resources.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if k == "gpus" else 1):
            raise SmileError(f"{path}: resources.{k}={v!r} is out of range")
    if base.batch_size % resources["workers"]:
        raise SmileError(f"{path}: batch_size={base.batch_size} does not split evenly over resources.workers={resources['workers']}")

    space_raw = raw.get("space")
    if not isinstance(space_raw, dict) or not space_raw:
        raise SmileError(f"{path}: space must map config keys to distributions")
    space = tuple(parse_param(path, name, spec, base) for name, spec in space_raw.items())
    if search == "hyperopt" and any(p.kind == "grid" for p in space):
        raise SmileError(f"{path}: grid values need search: grid or random (hyperopt samples)")
    return Study(path, base, metric, mode, n, search, concurrent, scheduler, resources, seed, space)
