"""torchvision's VGGs (``vgg11`` .. ``vgg19`` and their ``_bn`` variants) and AlexNet
(``alexnet``): a flat ``features`` sequence, ``avgpool``, then a classifier of two
hidden Linear-ReLU layers and the last Linear, with dropouts between.

Body: ``features`` and ``avgpool`` under torchvision's names, then the classifier's
hidden layers under torchvision's keys (VGG's ``classifier.0``, ``.3``; AlexNet's
``classifier.1``, ``.4``; the dropouts left out), giving the pre-logit feature as a
``(B, 4096, 1, 1)`` map (as for MobileNetV3: SMILE's feature target is that feature).
``fc`` is the last Linear, ``classifier.6``. Stages: ``features`` is one flat sequence,
so a stage is named by the last convolution before each max-pooling (the end of each
resolution block; DELTA and RegSL hook that convolution)."""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from smile_ray.models import BackboneSpec
from smile_ray.models.torchvision_family import family_spec


def split(net: nn.Module) -> tuple[nn.Module, nn.Linear, list[str]]:
    stages, last_conv = [], None
    for i, layer in enumerate(net.features):
        if isinstance(layer, nn.Conv2d):
            last_conv = i
        elif isinstance(layer, nn.MaxPool2d):
            stages.append(f"features.{last_conv}")
    *hidden, fc = [(str(i), m) for i, m in enumerate(net.classifier) if not isinstance(m, nn.Dropout)]
    width = [m for _, m in hidden if isinstance(m, nn.Linear)][-1].out_features
    pre_logits = nn.Sequential(OrderedDict([("flatten", nn.Flatten(1)), *hidden,
                                            ("unflatten", nn.Unflatten(1, (width, 1, 1)))]))
    body = nn.Sequential(OrderedDict(features=net.features, avgpool=net.avgpool, classifier=pre_logits))
    return body, fc[1], stages


def spec(name: str) -> BackboneSpec:
    return family_spec(name, split, fc_key="classifier.6")
