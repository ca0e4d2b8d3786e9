"""Build things by name: methods, datasets, backbones (timm's ``_registry`` in miniature).

Each catalog maps a name to the ``module:attribute`` that implements it, so that a name
can be checked (and ``--help`` can list the names) without importing torch; the module
is imported when the thing is first built. Adding a method, dataset or backbone is one
file in its package and one line here.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Any, Generic, Mapping, TypeVar

from smile_ray.errors import SmileError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> ``"module:attribute"`` table whose lookups fail with a message listing
    the valid names."""

    def __init__(self, kind: str, entries: Mapping[str, str]):
        self.kind = kind
        self._entries = dict(entries)

    def check(self, name: str) -> None:
        if name not in self._entries:
            same = [n for n in self.names() if n.lower() == str(name).lower()]
            close = same or difflib.get_close_matches(str(name), self.names(), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SmileError(f"unknown {self.kind} {name!r}{hint} (choose from: {', '.join(self.names())})")

    def get(self, name: str) -> T:
        self.check(name)
        module, _, attr = self._entries[name].partition(":")
        return getattr(importlib.import_module(module), attr)

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


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
})

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
    "image_folder": "smile_ray.data.image_folder:IMAGE_FOLDER",
})

BACKBONES: Registry[Any] = Registry("backbone", {
    "digits_cnn": "smile_ray.models.digits_cnn:DIGITS_CNN",
    "resnet18": "smile_ray.models.resnet:RESNET18",
    "resnet50": "smile_ray.models.resnet:RESNET50",
    "efficientnet_lite0": "smile_ray.models.efficientnet_lite:EFFICIENTNET_LITE0",
})


def check_names(config: Any, where: str = "config") -> None:
    """Refuse a config whose method, dataset or backbone is not registered."""
    for registry, key in ((METHODS, "method"), (DATASETS, "dataset"), (BACKBONES, "backbone")):
        try:
            registry.check(getattr(config, key))
        except SmileError as e:
            raise SmileError(f"{where}: {e}") from None
