"""torchvision's MobileNets: ``mobilenet_v2``, ``mobilenet_v3_small``, ``mobilenet_v3_large``.

Body: torchvision's ``features`` under its name. MobileNetV2's ``fc`` is
``classifier.1`` (its dropout left out). MobileNetV3 has a hidden layer between pooling
and the last linear layer (``classifier.0``, a Linear, then Hardswish): the body ends
with the pooling and that layer under torchvision's key (``classifier.0.*``), giving the
pre-logit feature as a ``(B, 1024, 1, 1)`` map (1280 for large), and ``fc`` is
``classifier.3`` (the dropout ``classifier.2`` left out). Stages: the inverted-residual
blocks, ``features.1`` .. ``features.N-2`` (torchvision does not group them by
resolution; each block is a stage, the stem and the last 1x1 convolution are not)."""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from smile_ray.models import BackboneSpec
from smile_ray.models.torchvision_family import family_spec


def split(net: nn.Module) -> tuple[nn.Module, nn.Linear, list[str]]:
    stages = [f"features.{i}" for i in range(1, len(net.features) - 1)]
    if isinstance(net.classifier[1], nn.Linear):  # V2: dropout, linear
        return nn.Sequential(OrderedDict(features=net.features)), net.classifier[1], stages
    hidden = net.classifier[0]
    pre_logits = nn.Sequential(OrderedDict([
        ("flatten", nn.Flatten(1)), ("0", hidden), ("1", net.classifier[1]),
        ("unflatten", nn.Unflatten(1, (hidden.out_features, 1, 1))),
    ]))
    body = nn.Sequential(OrderedDict(features=net.features, avgpool=net.avgpool, classifier=pre_logits))
    return body, net.classifier[3], stages


def spec(name: str) -> BackboneSpec:
    return family_spec(name, split, fc_key="classifier.1" if name == "mobilenet_v2" else "classifier.3")
