"""What every torchvision family shares: building a classification CNN by its
torchvision name, its weights by torchvision's tags, and the key map of its files.

A family file (``resnet.py``, ``efficientnet.py``, ...) says only how one of its
networks splits into a body (image -> feature map) and the source classifier ``fc`` (an
``nn.Linear`` on the pooled feature), and which of the body's modules are its stages;
:func:`family_spec` turns that into a ``spec(name)`` factory for
:data:`smile_ray.registry.BACKBONES`.

The body keeps torchvision's state-dict keys (its children carry torchvision's names),
so a torchvision file loads with one rename, ``<classifier key>.*`` -> ``fc.*``; files
that :meth:`~smile_ray.models.SourceModel.weights_state_dict` wrote (``fc.*`` already)
pass through unchanged.

Weights by tag: ``torchvision.models.get_model_weights(name)[tag]`` (``DEFAULT`` is
torchvision's alias of the recommended tag, e.g. ResNet-50's ``IMAGENET1K_V2``); the
file is torch's hub cache, ``torch.hub.get_dir()/checkpoints/<file name of the enum's
url>``, exactly where torchvision itself downloads it (``weights.get_state_dict``,
with its progress bar and hash check). The input normalisation is the weights' own,
``weights.transforms()``'s mean and std. Deviation: the resize and crop sides of
``transforms()`` (e.g. 232 / 224 for ResNet-50 V2) are not used: the image pipeline keeps
the SMILE reference's augmentation (resize to ``round(S * 256 / 224)``, crop ``S`` =
``image_size``), because the paper's results are measured with it and ``image_size`` is
a key of every run.

Deviations from torchvision's forward: the dropout before a classifier is left out (the
platform's ``fc`` is a plain ``nn.Linear``, as for EfficientNet-Lite); where torchvision
applies layers between pooling and the last linear layer (MobileNetV3's
Linear-Hardswish, ConvNeXt's LayerNorm), they are part of the body, applied to the
pooled feature, and the body's "feature map" is that pre-logit feature as a
``(B, C, 1, 1)`` map (so SMILE's feature target is the pre-logit feature there).
Evaluation-mode outputs equal torchvision's (tested).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from torch import nn

from smile_ray.errors import SmileError
from smile_ray.models import IMAGENET_NORM, BackboneSpec, Pretrained, declare_stages

#: ``split(net) -> (body, fc, stage names)`` for one torchvision network of the family
Split = Callable[[nn.Module], tuple[nn.Module, nn.Linear, list[str]]]


def torchvision_models() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def check_name(name: str) -> None:
    """One line, with the close torchvision names, for a name torchvision lacks."""
    import difflib

    names = torchvision_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise SmileError(f"unknown backbone {name!r}: torchvision has no classification model of that name{hint}")


def renamer(fc_key: str, extra: Callable[[str], str] | None = None):
    """A state dict's ``<fc_key>.*`` as ``fc.*`` (and other keys through ``extra``)."""
    prefix = fc_key + "."

    def convert(state):
        out = {}
        for key, value in state.items():
            if key.startswith(prefix):
                key = "fc." + key[len(prefix):]
            elif extra is not None:
                key = extra(key)
            out[key] = value
        return out

    return convert


def pretrained(name: str) -> Callable[[str], Pretrained]:
    """Resolves a torchvision weight tag of model ``name``."""

    def resolve(tag: str) -> Pretrained:
        import torch
        import torchvision

        enum = torchvision.models.get_model_weights(name)
        if tag not in enum.__members__:
            raise SmileError(f"weights={tag}: torchvision's {name} has no such weights "
                             f"(choose from: {', '.join(enum.__members__)})")
        weights = enum[tag]
        file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)
        transform = weights.transforms()
        norm = (tuple(transform.mean), tuple(transform.std))
        real_tag = weights.name if tag == "DEFAULT" else tag
        return Pretrained(real_tag, file, weights.url, functools.partial(weights.get_state_dict, progress=True,
                                                                         check_hash=True), norm)

    return resolve


def family_spec(name: str, split: Split, fc_key: str, key_map: Callable[[str], str] | None = None) -> BackboneSpec:
    """The :class:`BackboneSpec` of torchvision model ``name`` of a family."""
    check_name(name)
    convert = renamer(fc_key, key_map)

    def build(num_source_classes: int):
        import torchvision

        net = torchvision.models.get_model(name, weights=None, num_classes=num_source_classes)
        body, fc, stages = split(net)
        return declare_stages(body, stages), fc

    return BackboneSpec(build, in_channels=3, source_classes=1000, convert=convert, input_norm=IMAGENET_NORM,
                        pretrained=pretrained(name))
