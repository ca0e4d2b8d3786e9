"""torchvision's ConvNeXts: ``convnext_tiny``, ``_small``, ``_base``, ``_large``.

Body: torchvision's ``features`` under its name, then the pooling and the LayerNorm
that torchvision applies to the pooled feature (``classifier.0``, under its key): the
body's output is the normalised pre-logit feature as a ``(B, C, 1, 1)`` map. ``fc`` is
``classifier.2``. Stages: ``features.1``, ``.3``, ``.5``, ``.7`` (the even children are
the stem and the downsampling layers). ConvNeXt has LayerNorms, no BatchNorm: StochNorm
has nothing to replace there and refuses it."""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from smile_ray.models import BackboneSpec
from smile_ray.models.torchvision_family import family_spec


def split(net: nn.Module) -> tuple[nn.Module, nn.Linear, list[str]]:
    stages = [f"features.{i}" for i in range(1, len(net.features), 2)]
    pre_logits = nn.Sequential(OrderedDict([("0", net.classifier[0])]))
    body = nn.Sequential(OrderedDict(features=net.features, avgpool=net.avgpool, classifier=pre_logits))
    return body, net.classifier[2], stages


def spec(name: str) -> BackboneSpec:
    return family_spec(name, split, fc_key="classifier.2")
