"""The one config: every knob of a run, with one flat name used everywhere.

The same names appear in ``--set key=value``, in config/search-space/ablation YAML, in
MLflow params and in result tables. :func:`make_config` is the single place where user
input becomes a :class:`Config`; it validates types and ranges once and raises
:class:`~smile_ray.errors.SmileError` naming the key (and file) at fault.

Defaults are the SMILE reference values (``docs/method.md``) where they apply; only
``steps`` (and ``eval_every``) are scaled down for the embedded digits task, whose images
are 32 px instead of 224 px.

This module imports nothing of the package but :mod:`smile_ray.errors` and the name
tables of :mod:`smile_ray.registry` (plain strings, no torch).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

from smile_ray.errors import SmileError
from smile_ray.registry import BACKBONES, DATASETS, METHODS, check_names

# The reference implementation runs 9000 steps and drops the regularisers for the last
# 1000 of them; we keep that proportion whatever ``steps`` is.
REFERENCE_PLAIN_TAIL_FRACTION = 1000 / 9000

# RegSL's published runs train 30 epochs, counted from 1, reweighting from epoch 5 and
# relabelling from epoch 10: after 4 and 9 of the 30 epochs (this project counts steps).
REGSL_EPOCHS = 30
DELTA_VARIANTS = ("attention", "feature_map")
HEAD_INITS = ("torch", "xavier")


#: ``methods=ALL``: a key every method reads (the head L2 weight)
ALL = "all"


@dataclass(frozen=True)
class Rule:
    """A key's range: ``ok(value)`` and the text an error gives when it fails."""

    ok: Callable[[Any], bool]
    text: str


def at_least(n: float, text: str = "") -> Rule:
    return Rule(lambda v: v >= n, text or f"must be >= {n}")


def positive(text: str = "must be > 0") -> Rule:
    return Rule(lambda v: v > 0, text)


def within(lo: float, hi: float, closed: str = "[]") -> Rule:
    """``lo <= v <= hi``; ``closed`` says which ends belong: ``[]``, ``[)``, ``(]`` or ``()``."""
    left = (lambda v: v >= lo) if closed[0] == "[" else (lambda v: v > lo)
    right = (lambda v: v <= hi) if closed[1] == "]" else (lambda v: v < hi)
    return Rule(lambda v: left(v) and right(v), f"must be in {closed[0]}{lo}, {hi}{closed[1]}")


def one_of(*choices: str, text: str = "") -> Rule:
    return Rule(lambda v: v in choices, text or " or ".join(choices))


def _key(default: Any, help: str, rule: Rule | None = None, methods: tuple[str, ...] | str = (),
         when: str = "") -> Any:
    """One config key, declared once with everything that is known of it: its default,
    its help text (``--help``, ``docs/config.md``), its range (``rule``, checked by
    :func:`make_config`), the methods that read it (``methods``: names, or :data:`ALL`;
    empty for the keys every run reads) and the switch without which they do not
    (``when``: a boolean key). :data:`METHOD_KEYS` and each method's
    :meth:`~smile_ray.methods.base.Method.used_keys` derive from the last two."""
    return field(default=default, metadata={"help": help, "rule": rule, "methods": methods, "when": when})


@dataclass(frozen=True)
class Config:
    """A validated run configuration. Build it with :func:`make_config`."""

    # what to run
    method: str = _key("smile", f"fine-tuning method: {', '.join(METHODS.names())}")
    dataset: str = _key("digits", f"target dataset: {', '.join(DATASETS.names())} (digits is embedded)")
    backbone: str = _key("digits_cnn", f"backbone: {', '.join(BACKBONES.names())}, {BACKBONES.pattern_help}")
    weights: str = _key(
        "source",
        "source (pre-train on the dataset's source task, cached), imagenet (= DEFAULT), a weight tag of the "
        "backbone (torchvision's DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2, ...; timm's DEFAULT or a pretrained tag: "
        "read from torch's / timm's cache, downloaded when online unless SMILE_RAY_OFFLINE=1), none, or a file",
        rule=Rule(lambda v: v != "", "source, imagenet, a weight tag (DEFAULT, IMAGENET1K_V1, ...), none or a "
                  "file path"),
    )
    data_root: str = _key(
        "", "folder holding the dataset's files in their native layout ('' = the dataset's default location; "
        "the image datasets have none)",
    )
    samples_per_class: int = _key(
        5, "training images per target class, drawn by seed (used when train_images and sample_rate are 0)",
        rule=at_least(1),
    )
    # the paper's subsets (docs/method.md, "Subsets and splits"): C:25%/N:400 is
    # class_fraction=0.25 train_images=400; C:All/N:15% is sample_rate=0.15
    class_fraction: float = _key(
        1.0, "fraction of the target classes kept, chosen by seed (paper C:25% = 0.25); validation and test "
        "keep only those classes",
        rule=within(0, 1, "(]"),
    )
    train_images: int = _key(
        0, "training images in total from the kept classes, equal per class up to one (paper N:400); "
        "0: off. Exclusive with sample_rate",
        rule=at_least(0, "0 (off) or a count >= 1"),
    )
    sample_rate: float = _key(
        0.0, "fraction of each kept class's training pool drawn by seed (paper N:15% = 0.15, N:100% = 1); "
        "0: off. Exclusive with train_images",
        rule=Rule(lambda v: 0 <= v <= 1, "0 (off) or a fraction in (0, 1]"),
    )
    val_fraction: float = _key(
        0.1, "image datasets: fraction of each class's training images held out (fixed, whatever the seed) "
        "as the validation split, before any subset is drawn",
        rule=within(0, 1, "()"),
    )
    data_workers: int = _key(
        -1, "image datasets: DataLoader processes decoding and augmenting images; -1: min(4, CPUs this "
        "process may use: its CPU affinity, capped by OMP_NUM_THREADS, which Ray sets to a task's or "
        "worker's CPU reservation); 0: in the training process",
        rule=at_least(-1, "-1 (auto), 0 (in process) or a count >= 1"),
    )
    decode: str = _key(
        "auto", "image datasets: where images are decoded and augmented. cpu: PIL in the DataLoader workers; "
        "device: the workers only read the files' bytes and the training process decodes each batch on "
        "the run's device (torchvision.io.decode_jpeg, batched, then resize/crop/flip there; pixels close to "
        "cpu's, not identical); auto: cpu, until a GPU measurement shows device decoding faster",
        rule=one_of("auto", "cpu", "device", text="auto, cpu or device"),
    )
    skip_bad_images: bool = _key(
        False, "image datasets: leave out unreadable images with a warning (counted in metrics.json) "
        "instead of stopping with an error naming the first",
    )
    image_size: int = _key(32, "input side in pixels (digits 32; the paper uses 224)", rule=at_least(8))
    # optimisation
    steps: int = _key(300, "optimiser steps (reference: 9000 on 224 px datasets)", rule=at_least(1))
    batch_size: int = _key(48, "global batch size", rule=at_least(1))
    lr: float = _key(0.01, "SGD learning rate; x0.1 from lr_decay_step on", rule=positive())
    lr_decay_step: int = _key(
        -1,
        "step from which the lr is x0.1; -1: the reference's int(2 * (steps + steps / 9) / 3) "
        "(6666 of 9000, 222 of 300); a value >= steps: no drop",
        rule=at_least(-1, "-1 (reference) or a step >= 0"),
    )
    weight_decay: float = _key(1e-4, "SGD weight decay on all parameters", rule=at_least(0))
    momentum: float = _key(0.9, "SGD Nesterov momentum", rule=within(0, 1, "[)"))
    seed: int = _key(2022, "seed of the training subset, initialisation and every draw", rule=at_least(0))
    head_init: str = _key(
        "torch", "the new target classifier's initialisation: torch (nn.Linear's default, as the PyTorch baselines' "
        "codes get) or xavier (Xavier-uniform weight, zero bias: Paddle's Linear default, which the SMILE "
        "reference's new head gets)",
        rule=one_of(*HEAD_INITS),
    )
    # SMILE
    mixup_alpha: float = _key(
        0.2, "Beta(alpha, alpha) for the mixing weight lambda",
        rule=positive(), methods=("mixup", "smile"),
    )
    ema_decay: float = _key(
        0.999, "mean-teacher EMA decay",
        rule=within(0, 1, "[)"), methods=("smile",), when="mean_teacher",
    )
    ema_every: int = _key(
        10, "steps between mean-teacher updates",
        rule=at_least(1), methods=("smile",), when="mean_teacher",
    )
    ema_statistics: bool = _key(
        True, "smile: the mean teacher's BatchNorm running mean and variance follow the student's with the same "
        "EMA as its parameters (the reference, where they are Paddle parameters); false: parameters only, the "
        "statistics stay pre-trained (smile-ray before issue 35; for the ablation)",
        methods=("smile",), when="mean_teacher",
    )
    ema_decay_horizon: int = _key(
        0, "smile: 0: ema_decay is the decay per update; N: the run of N steps whose teacher drift to match "
        "(reference: 9000): the per-update decay becomes ema_decay^(updates in N steps / updates in this run), "
        "so a short run's teacher moves as far from the pre-trained model as the reference's does",
        rule=at_least(0, "0 (off) or a step count >= 1"), methods=("smile",), when="mean_teacher",
    )
    feature_weight: float = _key(
        0.01, "weight of the feature-mixup loss",
        rule=at_least(0), methods=("smile",), when="feature_mixup",
    )
    source_label_weight: float = _key(
        0.1, "weight of the source-label mixup loss",
        rule=at_least(0), methods=("smile",), when="source_label",
    )
    head_l2_weight: float = _key(
        1e-4, "weight of the L2 penalty on the classifier heads",
        rule=at_least(0), methods=ALL, when="head_l2",
    )
    plain_tail_fraction: float = _key(
        REFERENCE_PLAIN_TAIL_FRACTION, "final fraction of steps trained without mixup/regularisers",
        rule=within(0, 1, "[)"), methods=("mixup", "smile"), when="plain_tail",
    )
    # SMILE components (ablation switches)
    feature_mixup: bool = _key(True, "smile: mixed teacher feature maps as a target", methods=("smile",))
    source_label: bool = _key(True, "smile: source-label head trained on mixed teacher predictions", methods=("smile",))
    mean_teacher: bool = _key(True, "smile: teacher is an EMA of the student (else frozen)", methods=("smile",))
    label_mixup: bool = _key(
        True, "smile: target classifier trained on mixed labels (else clean CE)",
        methods=("smile",),
    )
    head_l2: bool = _key(True, "all methods: L2 penalty on the classifier heads")
    plain_tail: bool = _key(True, "mixup/smile: plain fine-tuning for the final steps", methods=("mixup", "smile"))
    # baselines (docs/method.md); each also pays the head L2 above when head_l2 is on
    l2sp_weight: float = _key(
        0.01, "l2sp: weight a of 0.5 * sum ||w - w0||^2 over the backbone (TLlib: 0.01)",
        rule=at_least(0), methods=("l2sp",),
    )
    bss_weight: float = _key(
        0.001, "bss: weight eta of the k smallest squared singular values of the batch features",
        rule=at_least(0), methods=("bss",),
    )
    bss_k: int = _key(
        1, "bss: how many of the smallest singular values are shrunk (>= 1)",
        rule=at_least(1), methods=("bss",),
    )
    delta_weight: float = _key(
        0.01, "delta: weight of the feature-map distance to the pre-trained network",
        rule=at_least(0), methods=("delta",),
    )
    delta_variant: str = _key(
        "attention",
        "delta: attention (channels weighted by their measured importance, computed once and cached; "
        "the published DELTA) or feature_map (unweighted)",
        rule=one_of(*DELTA_VARIANTS), methods=("delta",),
    )
    cotuning_weight: float = _key(
        2.3, "cotuning: weight lambda of the source-head loss to the category relationship",
        rule=at_least(0), methods=("cotuning",),
    )
    rifle_reinits: int = _key(
        3, "rifle: times the target classifier is re-initialised, evenly spaced (0: none)",
        rule=at_least(0), methods=("rifle",),
    )
    stochnorm_prob: float = _key(
        0.5, "stochnorm: per-channel probability of normalising with batch (else running) statistics in training",
        rule=within(0, 1), methods=("stochnorm",),
    )
    lwf_weight: float = _key(
        4.0, "lwf: weight of the distillation loss to the recorded source logits",
        rule=at_least(0), methods=("lwf",),
    )
    lwf_temperature: float = _key(
        3.0, "lwf: softmax temperature T of the distillation loss",
        rule=positive(), methods=("lwf",),
    )
    lwf_train_source_head: bool = _key(
        False, "lwf: train the source head too (false: frozen, out of the optimiser and its weight decay, as TLlib)",
        methods=("lwf",),
    )
    regsl_self_labelling: bool = _key(
        False, "regsl: relabel and reweight as the public code's label-noise runs do; false: the distance "
        "constraints alone, as its clean-label script (train_constraint.py) runs",
        methods=("regsl",),
    )
    regsl_radius: float = _key(
        7.8, "regsl: Frobenius radius D around the pre-trained weights of the first two backbone stages",
        rule=positive(), methods=("regsl",),
    )
    regsl_gamma: float = _key(
        1.0, "regsl: radius growth per later stage (stage l >= 3: D * gamma^(l-2))",
        rule=positive(), methods=("regsl",),
    )
    regsl_head_radius: float = _key(
        14.08, "regsl: Frobenius radius around 0 of the target classifier's weight",
        rule=positive(), methods=("regsl",),
    )
    regsl_relabel_threshold: float = _key(
        0.9, "regsl: a stored label is replaced when the model gives another class more than this probability",
        rule=within(0, 1), methods=("regsl",), when="regsl_self_labelling",
    )
    regsl_temperature: float = _key(
        2.0, "regsl: temperature T of the batch softmax(-loss / T) example weights",
        rule=positive(), methods=("regsl",), when="regsl_self_labelling",
    )
    regsl_relabel_start_fraction: float = _key(
        9 / REGSL_EPOCHS, "regsl: fraction of steps after which relabelling starts (epoch 10 of 30)",
        rule=within(0, 1), methods=("regsl",), when="regsl_self_labelling",
    )
    regsl_reweight_start_fraction: float = _key(
        4 / REGSL_EPOCHS, "regsl: fraction of steps after which examples are reweighted (epoch 5 of 30)",
        rule=within(0, 1), methods=("regsl",), when="regsl_self_labelling",
    )
    # measuring
    il_pairs: int = _key(
        256, "image pairs per split (train, test) on which the interpolation losses of the paper's Eq. 1 "
        "(Table 4) are measured once training ends (docs/method.md); 0: not measured",
        rule=at_least(0),
    )
    # running
    eval_every: int = _key(
        100, "steps between validation evaluations (and checkpoints, unless checkpoint_every)",
        rule=at_least(1),
    )
    checkpoint_every: int = _key(
        0, "steps between checkpoints (fault tolerance: an interrupted run loses at most this many steps; the "
        "last step always writes one), apart from the evaluations (the learning curve); 0: every eval_every steps",
        rule=at_least(0, "0 (every eval_every steps) or a count >= 1"),
    )
    device: str = _key(
        "auto", "auto, cpu, cuda or cuda:N",
        rule=Rule(lambda v: bool(_DEVICE.match(v)), "auto, cpu, cuda or cuda:N"),
    )
    threads: int = _key(
        0, "torch CPU threads; 0: the CPUs this process may use (its CPU affinity, capped by the CPUs Ray "
        "reserved for a trial or worker). On a machine shared with other jobs, 1 or 2 avoids oversubscription "
        "(several times faster there)",
        rule=at_least(0, "0 (torch's default) or a count >= 1"),
    )
    precision: str = _key(
        "auto", "auto (bf16 autocast on GPUs that have it natively, CUDA compute capability >= 8.0; fp32 on older "
        "GPUs, which emulate it, and on CPU), fp32 or bf16",
        rule=one_of("auto", "fp32", "bf16", text="auto, fp32 or bf16"),
    )
    channels_last: str = _key(
        "auto", "channels_last memory format: auto (on for CUDA, off on CPU, where it is slower), true or false"
    )
    compile: bool = _key(
        False, "torch.compile the student's forward (and SMILE's teacher's): faster CUDA steps after a one-off "
        "compile of tens of seconds per run; needs a C compiler on CPU"
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "Config":
        return make_config({**self.to_dict(), **changes})

    @property
    def resolved_lr_decay_step(self) -> int:
        """``lr_decay_step`` resolved: the first step trained at lr x0.1. The reference drops at
        ``int(2 * (max_iters + 1000) / 3)`` with 9000 steps: its 1000 extra are the plain
        tail's share (1/9 of the steps), kept as that proportion at other lengths."""
        if self.lr_decay_step >= 0:
            return self.lr_decay_step
        return int(2 * (self.steps + self.steps * REFERENCE_PLAIN_TAIL_FRACTION) / 3)

    @property
    def checkpoint_interval(self) -> int:
        """Steps between checkpoints: ``checkpoint_every``, or ``eval_every`` when it is 0."""
        return self.checkpoint_every or self.eval_every

    @property
    def plain_tail_start(self) -> int:
        """First step of the plain tail (``steps`` when the tail is off or empty)."""
        if not self.plain_tail:
            return self.steps
        return self.steps - int(round(self.plain_tail_fraction * self.steps))


KEYS: dict[str, dataclasses.Field] = {f.name: f for f in fields(Config)}

#: the keys only some methods read (declared with ``methods=``); a method ignores those it
#: does not read (:meth:`~smile_ray.methods.base.Method.used_keys`)
METHOD_KEYS: frozenset[str] = frozenset(k for k, f in KEYS.items() if f.metadata["methods"])


def reads(method: str, key: str, config: Config) -> bool:
    """Whether the method registered as ``method`` reads ``key`` under ``config``, as the
    key declares it (``methods=`` and ``when=``); a method may narrow this further
    (SMILE without a teacher reads no EMA key)."""
    f = KEYS[key]
    owners = f.metadata["methods"]
    if not owners or (owners != ALL and method not in owners):
        return False
    return not f.metadata["when"] or bool(getattr(config, f.metadata["when"]))

#: string keys that take auto, true or false (YAML and --set booleans accepted)
TRISTATE = ("channels_last",)

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _coerce(name: str, value: Any, kind: type, where: str) -> Any:
    """Turn a YAML / ``--set`` value into the field's type or fail naming it."""

    def bad() -> SmileError:
        return SmileError(
            f"{where}: {name}={value!r} is not a valid {kind.__name__}"
        )

    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise bad()
    if name in TRISTATE:  # auto, or a boolean in any of its spellings
        if isinstance(value, str) and value.lower() == "auto":
            return "auto"
        try:
            return "true" if _coerce(name, value, bool, where) else "false"
        except SmileError:
            raise SmileError(f"{where}: {name}={value!r} is not auto, true or false") from None
    if isinstance(value, bool):
        raise bad()
    if kind is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if kind is float:
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value)
            except ValueError:
                raise bad() from None
        else:
            raise bad()
        if not math.isfinite(out):
            raise bad()
        return out
    if kind is str:
        if isinstance(value, (str, int, float)):
            return str(value)
        raise bad()
    raise TypeError(kind)


_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def _check_ranges(c: Config, where: str) -> None:
    """Each key's declared :class:`Rule`, in declaration order, then the rules that tie
    keys together."""
    for name, f in KEYS.items():
        rule = f.metadata["rule"]
        if rule is not None and not rule.ok(getattr(c, name)):
            raise SmileError(f"{where}: {name}={getattr(c, name)!r} is out of range ({rule.text})")
    if c.train_images and c.sample_rate:
        raise SmileError(f"{where}: train_images={c.train_images} and sample_rate={c.sample_rate} are exclusive "
                         "(set one of them; 0 turns a key off)")


def make_config(values: Mapping[str, Any] | None = None, where: str = "config") -> Config:
    """Validate a mapping of config keys (missing keys take defaults) into a Config.

    ``where`` names the source of the values (a file, ``--set``) in error messages.
    """
    values = dict(values or {})
    unknown = [k for k in values if k not in KEYS]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(str(k), KEYS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SmileError(f"{where}: unknown config key {k!r}{hint}")
    typed = {}
    for k, v in values.items():
        kind = _TYPES[KEYS[k].type] if isinstance(KEYS[k].type, str) else KEYS[k].type
        typed[k] = _coerce(k, v, kind, where)
    config = Config(**typed)
    _check_ranges(config, where)
    check_names(config, where)
    return config


def check_int(value: Any, where: str, minimum: int, why: str = "") -> int:
    """The one integer check for file and option values that are not config keys
    (``num_samples``, ``seeds``, resources, ...)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SmileError(f"{where}={value!r} must be an integer >= {minimum}{f' ({why})' if why else ''}")
    return value


def parse_overrides(pairs: Iterable[str], where: str = "--set") -> dict[str, Any]:
    """``["mixup_alpha=0.4", "feature_mixup=false"]`` -> ``{"mixup_alpha": 0.4, ...}``."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SmileError(f"{where}: expected key=value, got {pair!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out[key] = value
    return out


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML (or JSON) file, turning every failure into a one-line SmileError."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SmileError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SmileError(f"{path}: cannot read ({e.__class__.__name__})") from None
    if path.suffix == ".json":
        import json

        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise SmileError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}"
                             " (a truncated or half-written file?)") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid syntax"
        raise SmileError(f"{path}: malformed YAML{at}: {problem}") from None


#: YAML files installed with the package (``search_spaces/`` and ``ablations/`` are the
#: repository's top-level folders, linked into the package), usable by name from anywhere
SHIPPED = Path(__file__).resolve().parent / "shipped"


def shipped_names(kind: str) -> list[str]:
    """Names of the shipped files of ``kind``: presets, search_spaces or ablations."""
    return sorted(p.stem for p in (SHIPPED / kind).glob("*.yaml"))


def preset_names() -> list[str]:
    return shipped_names("presets")


def find_shipped(path: str | Path, kind: str) -> Path:
    """``path`` itself if it exists (or looks like a path), else the shipped file of
    ``kind`` it names: ``fashion_mnist`` or ``fashion_mnist.yaml``, or
    ``search_spaces/smile.yaml`` run from outside the repository."""
    path = Path(path)
    if path.exists():
        return path
    for candidate in (SHIPPED / kind / path.name, SHIPPED / kind / f"{path.name}.yaml"):
        if (str(path) in (path.name, path.stem) or path.parent.name == kind) and candidate.is_file():
            return candidate
    return path


def find_config_file(path: str | Path) -> Path:
    """``path`` itself, or the shipped preset of that name when no such file exists."""
    return find_shipped(path, "presets")


def load_config_values(path: str | Path) -> dict[str, Any]:
    """Config keys from a YAML/JSON file, or a shipped preset named like ``fashion_mnist``.

    A file whose top level has a ``config`` mapping (``metrics.json`` of a run, a tuning
    study's ``best.json``) contributes that mapping, so a result is reusable as a config.
    """
    path = find_config_file(path)
    data = read_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SmileError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    if isinstance(data.get("config"), dict):
        data = data["config"]
    return data


def resolve_config(
    base: str | Path | Mapping[str, Any] | None = None,
    overrides: Iterable[str] | Mapping[str, Any] = (),
    *,
    where: str = "config",
    relative_to: Path | None = None,
    **explicit: Any,
) -> Config:
    """The one way to build a config from a base and overrides:
    defaults <- ``base`` <- ``explicit`` keyword values (None skipped) <- ``overrides``.

    ``base`` is a mapping of config keys (``where`` names it in errors) or a YAML/JSON
    file (a path relative to ``relative_to`` when given; a metrics.json or best.json
    contributes its ``config``). ``overrides`` are ``--set`` strings or a parsed mapping.
    Each source is validated on its own first, so an error blames the source at fault.
    """
    values: dict[str, Any] = {}
    if isinstance(base, (str, Path)):
        path = Path(base)
        if relative_to is not None and not path.is_absolute():
            path = relative_to / path
        values.update(load_config_values(path))
        where = str(path)
    elif base is not None:
        if not isinstance(base, Mapping):
            raise SmileError(f"{where}: expected a mapping of config keys or a file path, got {type(base).__name__}")
        values.update(base)
    make_config(values, where=where)  # blame the base for its own mistakes
    values.update({k: v for k, v in explicit.items() if v is not None})
    sets = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    values.update(sets)
    return make_config(values, where="--set" if sets else where)


def config_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Keys whose values differ between two config dicts."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
