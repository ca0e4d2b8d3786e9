"""torchvision's DenseNets: ``densenet121``, ``densenet161``, ``densenet169``, ``densenet201``.

Body: torchvision's ``features`` under its name, then the ReLU torchvision applies to
them before pooling; ``fc`` is ``classifier``. Stages: ``features.denseblock1`` ..
``denseblock4``. torchvision's published files keep the old key names
(``denselayer1.norm.1.weight``), which :func:`old_key` renames as torchvision's own
loader does (``denselayer1.norm1.weight``)."""
from __future__ import annotations

import re
from collections import OrderedDict

from torch import nn

from smile_ray.models import BackboneSpec
from smile_ray.models.torchvision_family import family_spec

_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def old_key(key: str) -> str:
    """``...denselayer1.norm.1.weight`` -> ``...denselayer1.norm1.weight`` (others unchanged)."""
    m = _OLD_KEY.match(key)
    return m.group(1) + m.group(2) if m else key


def split(net: nn.Module) -> tuple[nn.Module, nn.Linear, list[str]]:
    stages = [f"features.{n}" for n, _ in net.features.named_children() if n.startswith("denseblock")]
    return nn.Sequential(OrderedDict(features=net.features, relu=nn.ReLU())), net.classifier, stages


def spec(name: str) -> BackboneSpec:
    return family_spec(name, split, fc_key="classifier", key_map=old_key)
