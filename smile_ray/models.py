"""Backbones by name, the pre-trained source model, and the student network.

A backbone is a convolutional *body* (image -> last feature map before pooling) and a
*classifier* ``fc`` on the globally pooled feature. Weight files are flat state dicts in
torchvision's layout: body keys as torchvision names them (``conv1.weight``,
``layer1.0.bn1.running_mean``, ...) and ``fc.weight`` / ``fc.bias`` for the source
classifier, so a torchvision ResNet checkpoint loads as it is. Files are read with
``torch.load(weights_only=True)``; nothing is ever downloaded.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torchvision
from torch import Tensor, nn

from smile_ray.errors import SmileError
from smile_ray.registry import Registry


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a backbone: ``build(num_source_classes) -> (body, fc)``."""

    build: Callable[[int], tuple[nn.Module, nn.Linear]]
    in_channels: int
    # torchvision's ImageNet weight file name, looked up in torch's hub cache for
    # ``weights=imagenet``; None when the backbone has no published weights.
    hub_file: str | None = None
    hub_classes: int | None = None


BACKBONES: Registry[BackboneSpec] = Registry("backbone")


def _digits_cnn(num_source_classes: int) -> tuple[nn.Module, nn.Linear]:
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


BACKBONES.register("digits_cnn")(BackboneSpec(_digits_cnn, in_channels=1))


def _torchvision_resnet(arch: str) -> Callable[[int], tuple[nn.Module, nn.Linear]]:
    def build(num_source_classes: int) -> tuple[nn.Module, nn.Linear]:
        net = getattr(torchvision.models, arch)(weights=None, num_classes=num_source_classes)
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        # Named children keep torchvision's state-dict keys (conv1.weight, layer1.0...).
        return nn.Sequential(OrderedDict((n, getattr(net, n)) for n in names)), net.fc

    return build


BACKBONES.register("resnet18")(
    BackboneSpec(_torchvision_resnet("resnet18"), 3, "resnet18-f37072fd.pth", 1000)
)
BACKBONES.register("resnet50")(
    BackboneSpec(_torchvision_resnet("resnet50"), 3, "resnet50-0676ba61.pth", 1000)
)


def _adapt_channels(x: Tensor, in_channels: int) -> Tensor:
    # Grayscale data into an RGB backbone: repeat the channel, keeping pre-trained conv1.
    if x.shape[1] == 1 and in_channels == 3:
        return x.expand(-1, 3, -1, -1)
    return x


class SourceModel(nn.Module):
    """The pre-trained network: body + source classifier. The mean teacher is a copy."""

    def __init__(self, body: nn.Module, fc: nn.Linear, in_channels: int):
        super().__init__()
        self.body = body
        self.fc = fc
        self.in_channels = in_channels

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns ``(fmap, source_logits)``."""
        fmap = self.body(_adapt_channels(x, self.in_channels))
        return fmap, self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(fmap, 1), 1))

    def weights_state_dict(self) -> "OrderedDict[str, Tensor]":
        """State dict in the torchvision layout that :func:`load_source_model` reads."""
        out = OrderedDict((k, v) for k, v in self.body.state_dict().items())
        out.update((f"fc.{k}", v) for k, v in self.fc.state_dict().items())
        return out


class StudentOutput(NamedTuple):
    logits: Tensor
    fmap: Tensor
    aux_logits: Tensor | None


class TransferNet(nn.Module):
    """The student: pre-trained body, a new target classifier and, for SMILE, a
    source-label head initialised from the pre-trained source classifier."""

    def __init__(self, source: SourceModel, num_classes: int, source_head: bool):
        super().__init__()
        self.in_channels = source.in_channels
        self.body = copy.deepcopy(source.body)
        dim = source.fc.in_features
        self.classifier = nn.Linear(dim, num_classes)
        self.source_head = copy.deepcopy(source.fc) if source_head else None

    def forward(self, x: Tensor) -> StudentOutput:
        fmap = self.body(_adapt_channels(x, self.in_channels))
        pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(fmap, 1), 1)
        aux = self.source_head(pooled) if self.source_head is not None else None
        return StudentOutput(self.classifier(pooled), fmap, aux)

    def heads(self) -> tuple[nn.Module, ...]:
        return tuple(h for h in (self.classifier, self.source_head) if h is not None)


def build_source_model(backbone: str, num_source_classes: int) -> SourceModel:
    """A randomly initialised source model (pre-training starts here)."""
    spec = BACKBONES.get(backbone)
    body, fc = spec.build(num_source_classes)
    return SourceModel(body, fc, spec.in_channels)


def hub_weights_path(backbone: str) -> Path:
    """Where torchvision keeps ``backbone``'s ImageNet file in torch's hub cache."""
    spec = BACKBONES.get(backbone)
    if spec.hub_file is None:
        raise SmileError(f"weights=imagenet: backbone {backbone!r} has no ImageNet weights")
    return Path(torch.hub.get_dir()) / "checkpoints" / spec.hub_file


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """A flat state dict from a file, with ``weights_only=True``; one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise SmileError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or foreign files
        raise SmileError(f"weights file {path} is not a readable PyTorch state dict ({e.__class__.__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise SmileError(f"weights file {path} does not hold a flat state dict of tensors")
    return state


def load_source_model(backbone: str, path: str | Path) -> SourceModel:
    """Build ``backbone`` and load a torchvision-layout weight file into body and fc.

    The number of source classes is read off the file's ``fc.weight``.
    """
    state = read_weights(path)
    if "fc.weight" not in state:
        raise SmileError(f"weights file {path} has no source classifier (fc.weight)")
    model = build_source_model(backbone, int(state["fc.weight"].shape[0]))
    fc = {k[3:]: v for k, v in state.items() if k.startswith("fc.")}
    body = {k: v for k, v in state.items() if not k.startswith("fc.")}
    for part, values in ((model.fc, fc), (model.body, body)):
        try:
            result = part.load_state_dict(values, strict=False)
        except RuntimeError as e:
            detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), "shape mismatch")
            raise SmileError(f"weights file {path} does not fit backbone {backbone!r}: {detail}") from None
        if result.missing_keys or result.unexpected_keys:
            keys = result.missing_keys or result.unexpected_keys
            what = "lacks" if result.missing_keys else "has unexpected"
            raise SmileError(
                f"weights file {path} does not fit backbone {backbone!r}: it {what} {len(keys)} keys (e.g. {keys[0]})"
            )
    return model
