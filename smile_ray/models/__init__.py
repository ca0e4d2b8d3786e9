"""Backbones by name, the pre-trained source model, and the student network.

One file per backbone family (``digits_cnn.py``, ``resnet.py``) defines a
:class:`BackboneSpec`; :data:`smile_ray.registry.BACKBONES` names them.

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
from torch import Tensor, nn

from smile_ray.errors import SmileError
from smile_ray.registry import BACKBONES


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a backbone: ``build(num_source_classes) -> (body, fc)``."""

    build: Callable[[int], tuple[nn.Module, nn.Linear]]
    in_channels: int
    # outputs of the source classifier when no weight file says otherwise (weights=none)
    source_classes: int
    # Where ``weights=imagenet`` is read from (a function, so that finding it costs
    # nothing until asked); None when the backbone has no published weights.
    imagenet_file: Callable[[], Path] | None = None
    # Turns a weight file's state dict into the torchvision layout (body keys + fc.*)
    # when the file comes in another one; None for files already in it.
    convert: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None


def torch_hub_file(name: str) -> Callable[[], Path]:
    """A torchvision weight file in torch's hub cache (where torchvision puts downloads)."""

    def find() -> Path:
        return Path(torch.hub.get_dir()) / "checkpoints" / name

    return find


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


def imagenet_weights_path(backbone: str) -> Path:
    """Where ``backbone``'s ImageNet weights are read from for ``weights=imagenet``."""
    spec = BACKBONES.get(backbone)
    if spec.imagenet_file is None:
        raise SmileError(f"weights=imagenet: backbone {backbone!r} has no ImageNet weights")
    return spec.imagenet_file()


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
    convert = BACKBONES.get(backbone).convert
    if convert is not None:
        try:
            state = convert(state)
        except (KeyError, ValueError) as e:
            raise SmileError(f"weights file {path} does not fit backbone {backbone!r}: {e}") from None
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
