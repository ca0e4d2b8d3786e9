"""torchvision's MNASNets: ``mnasnet0_5``, ``mnasnet0_75``, ``mnasnet1_0``, ``mnasnet1_3``.

Body: torchvision's ``layers`` under its name (its forward then averages the map, as the
platform's head does); ``fc`` is ``classifier.1`` (the dropout ``classifier.0`` left
out). Stages: the six stacks of inverted-residual blocks, ``layers.8`` .. ``layers.13``
(the stem before them and the last 1x1 convolution after them are not stages)."""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from smile_ray.models import BackboneSpec
from smile_ray.models.torchvision_family import family_spec


def split(net: nn.Module) -> tuple[nn.Module, nn.Linear, list[str]]:
    return nn.Sequential(OrderedDict(layers=net.layers)), net.classifier[1], [f"layers.{i}" for i in range(8, 14)]


def spec(name: str) -> BackboneSpec:
    return family_spec(name, split, fc_key="classifier.1")
