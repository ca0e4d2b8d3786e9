"""torchvision's EfficientNets: ``efficientnet_b0`` .. ``efficientnet_b7`` (the paper's
Table 3 uses B4) and ``efficientnet_v2_s`` / ``_m`` / ``_l``.

Body: torchvision's ``features`` (stem, the MBConv / Fused-MBConv stages, the 1x1 head
convolution), kept under its name; ``fc`` is ``classifier.1`` (the dropout
``classifier.0`` is left out: :mod:`smile_ray.models.torchvision_family`). Stages: the
children of ``features`` between the stem and the head (seven for B0-B7, six for V2-S),
each a group of blocks of one resolution and width, so DELTA and RegSL see the network's
stages, not its 16 blocks as one. The blocks' stochastic depth is torchvision's and, as
there, active in training mode only."""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from smile_ray.models import BackboneSpec
from smile_ray.models.torchvision_family import family_spec


def split(net: nn.Module) -> tuple[nn.Module, nn.Linear, list[str]]:
    stages = [f"features.{i}" for i in range(1, len(net.features) - 1)]
    return nn.Sequential(OrderedDict(features=net.features)), net.classifier[1], stages


def spec(name: str) -> BackboneSpec:
    return family_spec(name, split, fc_key="classifier.1")
