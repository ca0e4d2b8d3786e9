"""torchvision ResNets, split into body (up to ``layer4``) and ``fc``, with torchvision's
state-dict keys, so that torchvision's ImageNet files load as they are (and, through
:func:`smile_ray.models.read_weights`, checkpoints wrapped in ``state_dict`` / ``model``
entries with ``module.`` prefixes, such as Places365's ResNet-50).

Input: ImageNet-normalised images (``input_norm``), which the image pipeline produces.
The tensor datasets (digits, Fashion-MNIST) keep their own normalisation."""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from torch import nn

from smile_ray.models import IMAGENET_NORM, BackboneSpec, torch_hub_file


def _torchvision_resnet(arch: str) -> Callable[[int], tuple[nn.Module, nn.Linear]]:
    def build(num_source_classes: int) -> tuple[nn.Module, nn.Linear]:
        import torchvision  # only ResNets need it (and it costs a second to import)

        net = getattr(torchvision.models, arch)(weights=None, num_classes=num_source_classes)
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        # Named children keep torchvision's state-dict keys (conv1.weight, layer1.0...).
        return nn.Sequential(OrderedDict((n, getattr(net, n)) for n in names)), net.fc

    return build


# Both take ImageNet-normalised images: the image pipeline applies IMAGENET_NORM (a
# Places365 ResNet-50, loaded as weights=<file>, was trained with the same statistics).
RESNET18 = BackboneSpec(_torchvision_resnet("resnet18"), 3, 1000, torch_hub_file("resnet18-f37072fd.pth"),
                        input_norm=IMAGENET_NORM)
RESNET50 = BackboneSpec(_torchvision_resnet("resnet50"), 3, 1000, torch_hub_file("resnet50-0676ba61.pth"),
                        input_norm=IMAGENET_NORM)
