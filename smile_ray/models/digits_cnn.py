"""``digits_cnn``: the small CNN of the embedded digits task."""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from smile_ray.models import BackboneSpec

#: the digits source task has five classes (digits 0-4)
DIGITS_SOURCE_CLASSES = 5


def build(num_source_classes: int) -> tuple[nn.Module, nn.Linear]:
    """Three conv-BN-ReLU stages, 32 -> 64 -> 128 channels; the last two stride 2, so a
    32 px digit gives a 128 x 8 x 8 feature map. Strided convolutions rather than max
    pooling: on CPU, max pooling cost as much as the convolutions in the teacher's
    forward pass."""

    def stage(i: int, cin: int, cout: int, stride: int) -> list[tuple[str, nn.Module]]:
        return [
            (f"conv{i}", nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)),
            (f"bn{i}", nn.BatchNorm2d(cout)),
            (f"relu{i}", nn.ReLU(inplace=True)),
        ]

    body = nn.Sequential(OrderedDict(stage(1, 1, 32, 1) + stage(2, 32, 64, 2) + stage(3, 64, 128, 2)))
    return body, nn.Linear(128, num_source_classes)


DIGITS_CNN = BackboneSpec(build, in_channels=1, source_classes=DIGITS_SOURCE_CLASSES)
