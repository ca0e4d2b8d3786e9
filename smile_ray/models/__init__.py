"""Backbones by name, the pre-trained source model, and the student network.

One file per backbone family defines a :class:`BackboneSpec` (``digits_cnn.py``,
``efficientnet_lite.py``) or, for torchvision's families (``resnet.py``,
``efficientnet.py``, ``mobilenet.py``, ``convnext.py``, ``densenet.py``, ``regnet.py``,
built by :mod:`smile_ray.models.torchvision_family`) and timm's models
(``timm_models.py``), a ``spec(name)`` factory; :data:`smile_ray.registry.BACKBONES`
names them. ``docs/backbones.md`` says how names, weight tags, caches and the registries
work.

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

Published weights by tag (``weights=DEFAULT``, ``IMAGENET1K_V2``, ..., ``imagenet`` =
``DEFAULT``): :attr:`BackboneSpec.pretrained` resolves a tag to a :class:`Pretrained`
(the file in the framework's cache, how to download it, the input normalisation it was
trained with); :func:`load_pretrained` reads it, downloading it first when the machine
is online and ``SMILE_RAY_OFFLINE`` is not set.

Input normalisation has one home, the backbone's weights (:func:`input_norm`): a
weight tag's own (mean, std), from the weights' metadata; for ``weights=none``,
``source`` or a file, the family's declared :attr:`BackboneSpec.input_norm` (ImageNet's
for torchvision and timm families, which is also what a Places365 file was trained
with). EfficientNet-Lite declares none because its body normalises its own input (TF
style); ``digits_cnn`` has none. Both the image pipeline (:mod:`smile_ray.data.images`)
and the in-memory datasets read it.

Stages (DELTA's layers, RegSL's radii): a family declares them by name
(:func:`declare_stages`, kept as the body's ``stage_names``); a body without a
declaration gets :func:`smile_ray.methods.base.stages`'s rule.
"""
from __future__ import annotations

import copy
import os
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
    # Resolves a weight tag (DEFAULT, IMAGENET1K_V1, ...; "imagenet" arrives as DEFAULT)
    # to the published weights; None: the backbone has only ``imagenet_file`` (or nothing).
    pretrained: Callable[[str], "Pretrained"] | None = None


@dataclass(frozen=True)
class Pretrained:
    """Published weights named by a tag: where they are cached and what they expect."""

    tag: str  # the tag as the framework names it (DEFAULT resolved: IMAGENET1K_V2)
    file: Path  # where the framework keeps (and downloads) the file
    url: str  # where they come from (for the one-line message)
    download: Callable[[], None]  # fetches the file into ``file`` (with a progress bar)
    input_norm: tuple[tuple[float, ...], tuple[float, ...]] | None
    # the file's state dict in this backbone's layout (None: read ``file`` as a weight file)
    read: Callable[[Path], dict[str, Tensor]] | None = None


#: the environment variable that forbids downloading weights ("1", "true", "yes")
OFFLINE_ENV = "SMILE_RAY_OFFLINE"


def offline() -> bool:
    """Whether downloads are forbidden (``SMILE_RAY_OFFLINE=1``)."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def is_weight_tag(weights: str) -> bool:
    """``imagenet`` or a tag as frameworks spell them (upper case: DEFAULT, IMAGENET1K_V2)."""
    return weights == "imagenet" or (weights[:1].isupper() and weights.replace("_", "").isalnum()
                                     and weights.upper() == weights)


def declare_stages(body: nn.Module, names: list[str] | tuple[str, ...]) -> nn.Module:
    """Record the qualified names of ``body``'s stages on it (deep copies keep them)."""
    for name in names:
        body.get_submodule(name)  # a family that names a missing stage is a bug: fail now
    body.stage_names = tuple(names)
    return body


def pretrained_weights(backbone: str, tag: str) -> Pretrained:
    """The published weights ``tag`` of ``backbone`` (``imagenet`` = ``DEFAULT``)."""
    spec = BACKBONES.get(backbone)
    tag = "DEFAULT" if tag == "imagenet" else tag
    if spec.pretrained is None:
        raise SmileError(f"weights={tag}: backbone {backbone!r} has no published weights by tag "
                         f"(use weights=none, source or a file)")
    return spec.pretrained(tag)


def input_norm(backbone: str, weights: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The (mean, std) the backbone's weights expect of images in [0, 1] (None: it takes
    them as they are): a weight tag's own, else the family's declaration."""
    spec = BACKBONES.get(backbone)
    if is_weight_tag(weights) and spec.pretrained is not None:
        return pretrained_weights(backbone, weights).input_norm
    return spec.input_norm


def load_pretrained(backbone: str, tag: str) -> tuple["SourceModel", str]:
    """The source model with the published weights ``tag``: read from the framework's
    cache, downloaded there first when missing (unless offline)."""
    weights = pretrained_weights(backbone, tag)
    where = f"put {weights.file.name} (from {weights.url}) in {weights.file.parent}"
    if not weights.file.is_file():
        if offline():
            raise SmileError(f"weights={tag}: {weights.file.name} is not in {weights.file.parent} and "
                             f"{OFFLINE_ENV}=1 forbids downloading; {where}")
        try:
            weights.download()
        except SmileError:
            raise
        except Exception as e:  # no network, a proxy, a hash mismatch: all one line
            why = str(e).splitlines()[0] if str(e) else ""
            raise SmileError(f"weights={tag}: downloading {weights.url} failed ({e.__class__.__name__}: {why}); "
                             f"put {weights.file.name} in {weights.file.parent}") from None
        weights = pretrained_weights(backbone, tag)  # where the download put it
    state = weights.read(weights.file) if weights.read is not None else None
    return load_source_model(backbone, weights.file, state=state), str(weights.file)


#: torchvision's ImageNet normalisation (also Places365's)
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


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
    if spec.pretrained is not None:
        return pretrained_weights(backbone, "DEFAULT").file
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


def load_source_model(backbone: str, path: str | Path, state: dict[str, Tensor] | None = None) -> SourceModel:
    """Build ``backbone`` and load a torchvision-layout weight file into body and fc
    (``state``: the file's state dict, already read).

    The number of source classes is read off the file's ``fc.weight``.
    """
    state = read_weights(path) if state is None else state
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
