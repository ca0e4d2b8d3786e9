"""Build things by name: methods, datasets, backbones (timm's ``_registry`` in miniature).

Each catalog maps a name to the ``module:attribute`` that implements it, so that a name
can be checked (and ``--help`` can list the names) without importing torch; the module
is imported when the thing is first built. Adding a method, dataset or backbone is one
file in its package and one line here.

Backbones are also named by pattern: any torchvision classification CNN of a family
that has a file under :mod:`smile_ray.models` (``resnet34``, ``efficientnet_b4``,
``convnext_tiny``, ...; :data:`TORCHVISION_FAMILIES`), and ``timm/<model name>`` (the
optional extra ``smile-ray[timm]``). A pattern's factory, ``module:function``, is called
with the name and returns the thing; whether torchvision really has that model is
checked when it is built (one line with the close names).

Open to users (:func:`register`): ``smile_ray.register_method("mine", MyMethod)`` in the
process, or, so that every process sees it (Ray's workers too), an entry point in the
``smile_ray.methods``, ``smile_ray.datasets`` or ``smile_ray.backbones`` group of an
installed package (``mine = mypackage.module:MyMethod``). A name that is taken, by
smile-ray or by another package, is refused with one line.
"""
from __future__ import annotations

import difflib
import importlib
import re
from importlib import metadata
from typing import Any, Callable, Generic, Mapping, TypeVar

from smile_ray.errors import SmileError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> ``"module:attribute"`` (or object) table whose lookups fail with a
    message listing the valid names; ``patterns`` name families of things by regex."""

    def __init__(self, kind: str, entries: Mapping[str, str], group: str,
                 patterns: Mapping[str, str] | None = None, pattern_help: str = "",
                 more_names: Callable[[], list[str]] | None = None):
        self.kind, self.group = kind, group
        self._entries: dict[str, Any] = dict(entries)
        self._builtin = frozenset(self._entries)
        self._patterns = {re.compile(p): ref for p, ref in (patterns or {}).items()}
        self._pattern_help = pattern_help
        self._more_names = more_names  # names the patterns build, for suggestions (may import)
        self._entry_points_read = False
        self._clash: SmileError | None = None
        self._cache: dict[str, Any] = {}

    @property
    def pattern_help(self) -> str:
        """What the patterns name, in words (for ``--help``)."""
        return self._pattern_help

    def _read_entry_points(self, strict: bool = True) -> None:
        """Add the installed packages' entry points (once). A clash is kept and raised by
        every strict lookup, never by :meth:`names` (``--help`` is built at import)."""
        if not self._entry_points_read:
            self._entry_points_read = True
            for ep in metadata.entry_points(group=self.group):
                where = f"entry point {ep.name} = {ep.value} ({self.group}"
                where += f", package {ep.dist.name})" if getattr(ep, "dist", None) else ")"
                if ep.name in self._entries or self._pattern(ep.name) is not None:
                    taken = self._describe(ep.name) if ep.name in self._entries else "a name built by pattern"
                    self._clash = self._clash or SmileError(
                        f"{where}: {self.kind} {ep.name!r} is already registered ({taken}); rename it in the package")
                    continue
                self._entries[ep.name] = ep.value
        if strict and self._clash is not None:
            raise self._clash

    def _describe(self, name: str) -> str:
        ref = self._entries[name]
        if isinstance(ref, str):
            return ref
        if hasattr(ref, "__name__"):
            return f"{ref.__module__}:{ref.__qualname__}"
        return f"a {type(ref).__name__} registered in this process"

    def register(self, name: str, thing: Any) -> None:
        """Add ``name``: ``thing`` is the object (a method class, a DatasetSpec, a
        BackboneSpec) or its ``"module:attribute"``. A taken name is refused."""
        self._read_entry_points()
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-/]*", name):
            raise SmileError(f"register_{self.kind}: {name!r} is not a name (letters, digits, _ . - /)")
        if name in self._entries or self._pattern(name) is not None:
            taken = self._describe(name) if name in self._entries else "a name smile-ray builds by pattern"
            raise SmileError(f"register_{self.kind}: {self.kind} {name!r} is already registered ({taken}); "
                             "pick another name")
        self._entries[name] = thing

    def _pattern(self, name: str) -> str | None:
        return next((ref for p, ref in self._patterns.items() if p.fullmatch(name)), None)

    def check(self, name: str) -> None:
        self._read_entry_points()
        if name in self._entries or self._pattern(name) is not None:
            return
        known = self.names()
        if self._more_names is not None:
            known += [n for n in self._more_names() if self._pattern(n) is not None]
        same = [n for n in known if n.lower() == str(name).lower()]
        close = same or difflib.get_close_matches(str(name), known, n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise SmileError(f"unknown {self.kind} {name!r} (choose from: {', '.join(self.names())}"
                         f"{', ' + self._pattern_help if self._pattern_help else ''}){hint}")

    def get(self, name: str) -> T:
        self.check(name)
        if name in self._cache:
            return self._cache[name]
        ref = self._entries.get(name)
        if ref is None:  # a family's factory builds it by name
            module, _, attr = self._pattern(name).partition(":")
            thing = getattr(importlib.import_module(module), attr)(name)
        elif isinstance(ref, str):
            module, _, attr = ref.partition(":")
            try:
                thing = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as e:
                if name in self._builtin:
                    raise
                raise SmileError(f"{self.kind} {name!r}: {ref} cannot be loaded ({e})") from None
        else:
            thing = ref
        self._cache[name] = thing
        return thing

    def names(self) -> list[str]:
        self._read_entry_points(strict=False)
        return list(self._entries)

    def names_of(self, thing: Any) -> list[str]:
        """The names ``thing`` is registered under (loading each entry; one that cannot be
        loaded is skipped): how a method class finds the keys declared for its name."""
        out = []
        for name in self.names():
            try:
                if self.get(name) is thing:
                    out.append(name)
            except Exception:  # a broken entry point is reported when it is asked for by name
                continue
        return out

    def __contains__(self, name: object) -> bool:
        self._read_entry_points(strict=False)
        return isinstance(name, str) and (name in self._entries or self._pattern(name) is not None)


METHODS: Registry[Any] = Registry("method", {
    "l2": "smile_ray.methods.l2:L2",
    "mixup": "smile_ray.methods.mixup:Mixup",
    "smile": "smile_ray.methods.smile:Smile",
    "l2sp": "smile_ray.methods.l2sp:L2SP",
    "bss": "smile_ray.methods.bss:BSS",
    "lwf": "smile_ray.methods.lwf:LwF",
    "cotuning": "smile_ray.methods.cotuning:CoTuning",
    "rifle": "smile_ray.methods.rifle:Rifle",
    "stochnorm": "smile_ray.methods.stochnorm:StochNorm",
    "delta": "smile_ray.methods.delta:Delta",
    "regsl": "smile_ray.methods.regsl:RegSL",
}, group="smile_ray.methods")

DATASETS: Registry[Any] = Registry("dataset", {
    "digits": "smile_ray.data.digits:DIGITS",
    "fashion_mnist": "smile_ray.data.fashion_mnist:FASHION_MNIST",
    "fashion_mnist5": "smile_ray.data.fashion_mnist:FASHION_MNIST5",
    "cub200": "smile_ray.data.cub200:CUB200",
    "stanford_cars": "smile_ray.data.stanford_cars:STANFORD_CARS",
    "fgvc_aircraft": "smile_ray.data.fgvc_aircraft:FGVC_AIRCRAFT",
    "mit_indoor67": "smile_ray.data.mit_indoor67:MIT_INDOOR67",
    "stanford_dogs": "smile_ray.data.stanford_dogs:STANFORD_DOGS",
    "oxford_flowers102": "smile_ray.data.oxford_flowers102:OXFORD_FLOWERS102",
    "cifar100": "smile_ray.data.cifar100:CIFAR100",
    "food101": "smile_ray.data.food101:FOOD101",
    "image_folder": "smile_ray.data.image_folder:IMAGE_FOLDER",
}, group="smile_ray.datasets")

#: torchvision's classification CNNs by family: the torchvision names a family file of
#: smile_ray.models builds (a regex) -> its ``spec(name)`` factory. torchvision itself
#: decides, when the model is built, whether the name exists.
TORCHVISION_FAMILIES = {
    r"(resnet|wide_resnet|resnext)\d+\w*": "smile_ray.models.resnet:spec",
    r"efficientnet_(b\d|v2_\w+)": "smile_ray.models.efficientnet:spec",
    r"mobilenet_v(2|3_\w+)": "smile_ray.models.mobilenet:spec",
    r"convnext_\w+": "smile_ray.models.convnext:spec",
    r"densenet\d+": "smile_ray.models.densenet:spec",
    r"regnet_[xy]_\w+": "smile_ray.models.regnet:spec",
    r"vgg\d+(_bn)?|alexnet": "smile_ray.models.vgg:spec",
    r"shufflenet_v2_x\d_\d": "smile_ray.models.shufflenet:spec",
    r"mnasnet\d_\d+": "smile_ray.models.mnasnet:spec",
}
#: timm's models (the optional extra smile-ray[timm]) as ``timm/<model name>``
TIMM_PATTERN = {r"timm/\S+": "smile_ray.models.timm_models:spec"}

def torchvision_names() -> list[str]:
    """torchvision's classification models (imports torchvision: only for a suggestion)."""
    try:
        import torchvision
    except ImportError:
        return []
    return list(torchvision.models.list_models(module=torchvision.models))


BACKBONES: Registry[Any] = Registry("backbone", {
    "digits_cnn": "smile_ray.models.digits_cnn:DIGITS_CNN",
    "efficientnet_lite0": "smile_ray.models.efficientnet_lite:EFFICIENTNET_LITE0",
}, group="smile_ray.backbones", patterns={**TORCHVISION_FAMILIES, **TIMM_PATTERN},
    pattern_help="any torchvision classification CNN by its torchvision name (resnet18, resnet50, wide_resnet50_2, "
                 "resnext50_32x4d, efficientnet_b0..b7, efficientnet_v2_s/m/l, mobilenet_v2, mobilenet_v3_small/large, "
                 "convnext_tiny/small/base/large, densenet121/161/169/201, regnet_x_*/regnet_y_*) "
                 "or timm/<model name> (pip install 'smile-ray[timm]')", more_names=torchvision_names)


def register_method(name: str, method: Any) -> None:
    """Make ``method`` (a :class:`~smile_ray.methods.base.Method` subclass, or its
    ``"module:Class"``) usable as ``method=name`` in this process."""
    METHODS.register(name, method)


def register_dataset(name: str, dataset: Any) -> None:
    """Make ``dataset`` (a :class:`~smile_ray.data.DatasetSpec`, or its
    ``"module:NAME"``) usable as ``dataset=name`` in this process."""
    DATASETS.register(name, dataset)


def register_backbone(name: str, backbone: Any) -> None:
    """Make ``backbone`` (a :class:`~smile_ray.models.BackboneSpec`, or its
    ``"module:NAME"``) usable as ``backbone=name`` in this process."""
    BACKBONES.register(name, backbone)


def check_names(config: Any, where: str = "config") -> None:
    """Refuse a config whose method, dataset or backbone is not registered."""
    for registry, key in ((METHODS, "method"), (DATASETS, "dataset"), (BACKBONES, "backbone")):
        try:
            registry.check(getattr(config, key))
        except SmileError as e:
            raise SmileError(f"{where}: {e}") from None
