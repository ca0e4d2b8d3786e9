"""torchvision's ResNet family: ``resnet18`` .. ``resnet152``, ``wide_resnet50_2``,
``wide_resnet101_2``, ``resnext50_32x4d``, ``resnext101_32x8d``, ``resnext101_64x4d``.

Body: ``conv1``, ``bn1``, ``relu``, ``maxpool``, ``layer1`` .. ``layer4`` (torchvision's
names, so torchvision's files load as they are, and, through
:func:`smile_ray.models.read_weights`, checkpoints wrapped in ``state_dict`` / ``model``
entries with ``module.`` prefixes, such as Places365's ResNet-50); ``fc`` is
torchvision's. Stages: ``layer1`` .. ``layer4`` (the stem is not a stage, as in DELTA's
and RegSL's public codes). Input: ImageNet-normalised images."""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from smile_ray.models import BackboneSpec
from smile_ray.models.torchvision_family import family_spec

STAGES = ["layer1", "layer2", "layer3", "layer4"]


def split(net: nn.Module) -> tuple[nn.Module, nn.Linear, list[str]]:
    names = ["conv1", "bn1", "relu", "maxpool", *STAGES]
    return nn.Sequential(OrderedDict((n, getattr(net, n)) for n in names)), net.fc, STAGES


def spec(name: str) -> BackboneSpec:
    return family_spec(name, split, fc_key="fc")
