"""torchvision's ShuffleNet V2s: ``shufflenet_v2_x0_5`` .. ``shufflenet_v2_x2_0``.

Body: ``conv1``, ``maxpool``, ``stage2`` .. ``stage4`` and ``conv5`` under torchvision's
names (its forward then averages the map, as the platform's head does); ``fc`` is
torchvision's ``fc``. Stages: ``stage2``, ``stage3``, ``stage4``."""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from smile_ray.models import BackboneSpec
from smile_ray.models.torchvision_family import family_spec

PARTS = ("conv1", "maxpool", "stage2", "stage3", "stage4", "conv5")


def split(net: nn.Module) -> tuple[nn.Module, nn.Linear, list[str]]:
    body = nn.Sequential(OrderedDict((part, getattr(net, part)) for part in PARTS))
    return body, net.fc, ["stage2", "stage3", "stage4"]


def spec(name: str) -> BackboneSpec:
    return family_spec(name, split, fc_key="fc")
