"""Backbones by name, the pre-trained source model, and the student network.

One file per backbone family (``digits_cnn.py``, ``resnet.py``) defines a
:class:`BackboneSpec`; :data:`smile_ray.registry.BACKBONES` names them.

A backbone is a convolutional *body* (image -> last feature map before pooling) and a
*classifier* ``fc`` on the globally pooled feature. Weight files are flat state dicts in
torchvision's layout: body keys as torchvision names them (``conv1.weight``,
``layer1.0.bn1.running_mean``, ...) and ``fc.weight`` / ``fc.bias`` for the source
classifier, so a torchvision ResNet checkpoint loads as it is. Files are read with
``torch.load(weights_only=True)``; nothing is ever downloaded.

Checkpoint wrappers are unwrapped (:func:`read_weights`): a state dict under a
``state_dict``, ``model``, ``model_state_dict``, ``model_state``, ``net`` or ``network``
entry (nested up to three deep, other entries such as ``epoch`` ignored), and key
prefixes ``module.`` (DataParallel / DDP) and ``_orig_mod.`` (``torch.compile``) are
stripped, so e.g. the Places365 ResNet-50 checkpoint (``resnet50_places365.pth.tar``:
``{"epoch", "arch", "state_dict": {"module.conv1.weight", ...}, "best_prec1"}``, 365
classes) loads as ``weights=<file>``.

Input normalisation has one home per backbone: :attr:`BackboneSpec.input_norm`, the
per-channel (mean, std) the image pipeline (:mod:`smile_ray.data.images`) applies to
images in [0, 1]. ResNets declare ImageNet's; EfficientNet-Lite declares none because
its body normalises its own input (TF style); ``digits_cnn`` has none.
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
    # Per-channel (mean, std) the image pipeline applies to images in [0, 1] before the
    # body; None when the body takes [0, 1] images (it normalises them itself, or was
    # trained here on the tensor datasets' own normalisation).
    input_norm: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None


#: torchvision's ImageNet normalisation (also Places365's)
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


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


def init_head(layer: nn.Linear, scheme: str) -> nn.Linear:
    """Initialise a new classifier in place (``head_init``) and return it.

    ``torch``: ``nn.Linear``'s own (weight ``kaiming_uniform_(a=sqrt(5))``, i.e.
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the bias from the same range), what the
    PyTorch baselines' codes get. ``xavier``: weight U(-a, a) with
    ``a = sqrt(6 / (fan_in + fan_out))``, bias 0: Paddle's ``nn.Linear`` default, which
    the SMILE reference's new head keeps (its ``set_dict`` of the ImageNet weights skips
    the ``fc`` of another shape)."""
    if scheme == "xavier":
        nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(layer.bias)
    elif scheme != "torch":
        raise ValueError(f"unknown head initialisation {scheme!r}")
    return layer


class TransferNet(nn.Module):
    """The student: pre-trained body, a new target classifier (initialised by
    :func:`init_head`) and, for SMILE, LwF and Co-Tuning, a source head initialised from
    the pre-trained source classifier."""

    def __init__(self, source: SourceModel, num_classes: int, source_head: bool, head_init: str = "torch"):
        super().__init__()
        self.in_channels = source.in_channels
        self.body = copy.deepcopy(source.body)
        dim = source.fc.in_features
        self.classifier = init_head(nn.Linear(dim, num_classes), head_init)
        self.source_head = copy.deepcopy(source.fc) if source_head else None

    def forward(self, x: Tensor) -> StudentOutput:
        fmap = self.body(_adapt_channels(x, self.in_channels))
        pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(fmap, 1), 1)
        aux = self.source_head(pooled) if self.source_head is not None else None
        return StudentOutput(self.classifier(pooled), fmap, aux)

    def heads(self, trainable: bool = False) -> tuple[nn.Module, ...]:
        """The classifier heads; with ``trainable``, only those with a parameter that
        trains (LwF's frozen source head is left out of the head L2: a constant there)."""
        heads = (h for h in (self.classifier, self.source_head) if h is not None)
        if trainable:
            return tuple(h for h in heads if any(p.requires_grad for p in h.parameters()))
        return tuple(heads)


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


#: entries of a checkpoint dict that hold the model's state dict (first found wins)
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "model_state", "net", "network")
#: key prefixes added by wrappers: DataParallel / DDP, torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _is_flat(state: object) -> bool:
    return isinstance(state, dict) and bool(state) and all(isinstance(v, Tensor) for v in state.values())


def unwrap_checkpoint(state: object) -> object:
    """The state dict inside common checkpoint wrappers, with wrapper prefixes stripped."""
    for _ in range(3):
        if _is_flat(state) or not isinstance(state, dict):
            break
        inner = next((state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    if _is_flat(state):
        out = {}
        for key, value in state.items():
            stripped = True
            while stripped:
                stripped = False
                for prefix in WRAPPER_PREFIXES:
                    if key.startswith(prefix):
                        key, stripped = key[len(prefix):], True
            out[key] = value
        state = out
    return state


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """A flat state dict from a file, with ``weights_only=True``, unwrapped from common
    checkpoint wrappers (module docstring); one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise SmileError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or foreign files
        raise SmileError(f"weights file {path} is not a readable PyTorch state dict ({e.__class__.__name__})") from None
    state = unwrap_checkpoint(state)
    if not _is_flat(state):
        raise SmileError(f"weights file {path} does not hold a flat state dict of tensors "
                         f"(nor one under {', '.join(WRAPPER_KEYS)})")
    return state


def _first_bad_shape(module: nn.Module, values: dict[str, Tensor]) -> str | None:
    expected = module.state_dict()
    for key, value in values.items():
        if key in expected and tuple(expected[key].shape) != tuple(value.shape):
            return f"{key} has shape {tuple(value.shape)} in the file, {tuple(expected[key].shape)} in the model"
    return None


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
    for part, values, prefix in ((model.body, body, ""), (model.fc, fc, "fc.")):
        bad = _first_bad_shape(part, values)
        if bad:
            raise SmileError(f"weights file {path} does not fit backbone {backbone!r}: {prefix}{bad}")
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
