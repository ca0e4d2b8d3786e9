"""torchvision's RegNets: ``regnet_x_400mf`` .. ``regnet_y_128gf``.

Body: ``stem`` and ``trunk_output`` under torchvision's names; ``fc`` is torchvision's.
Stages: ``trunk_output.block1`` .. ``block4``."""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from smile_ray.models import BackboneSpec
from smile_ray.models.torchvision_family import family_spec


def split(net: nn.Module) -> tuple[nn.Module, nn.Linear, list[str]]:
    stages = [f"trunk_output.{n}" for n, _ in net.trunk_output.named_children()]
    return nn.Sequential(OrderedDict(stem=net.stem, trunk_output=net.trunk_output)), net.fc, stages


def spec(name: str) -> BackboneSpec:
    return family_spec(name, split, fc_key="fc")
