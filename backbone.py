"""Encoder backbones f (section 3.3 and appendix A: ResNet-50 in the paper; ResNet-18 is common
for CIFAR-scale runs).

A registry of torchvision ResNets with random initialisation or weights from a local file, each
with a CIFAR variant (3x3 stride-1 stem, no max-pool) for 32 px images, and a small convolutional
network for quick CPU runs (the offline default). Every backbone returns the flattened
representation y (the average-pooled features); ``feature_size`` says how long it is.

Random initialisation (``init``, :data:`INITIALISATIONS`): ``reference`` (the default) is the
authors' (:func:`reference_init_`: haiku's defaults as their BYOL code uses them); ``torchvision``
keeps torchvision's and torch's own. docs/fidelity.md lists both with measured statistics.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torchvision
from torch import nn

from utils import InputError


@dataclass(frozen=True)
class BackboneSpec:
    build: Callable[[], nn.Module]
    feature_size: int
    description: str


INITIALISATIONS = ("reference", "torchvision")


def check_initialisation(init: str) -> None:
    if init not in INITIALISATIONS:
        raise ValueError(f"unknown initialisation {init!r}; known: {', '.join(INITIALISATIONS)}")


def truncated_normal_fan_in_(weight: torch.Tensor) -> torch.Tensor:
    """haiku's default for ``hk.Linear`` and ``hk.Conv2D`` weights: ``TruncatedNormal(stddev =
    1 / sqrt(fan_in))``, cut at 2 standard deviations and not rescaled, so the sample standard
    deviation is 0.8796 / sqrt(fan_in). fan_in: inputs per output unit (in_features, or
    in_channels / groups x kernel area), as haiku counts it."""
    std = 1.0 / math.sqrt(weight[0].numel())
    # By the inverse of the normal CDF: u uniform on (Phi(-2), Phi(2)), x = sqrt(2) erfinv(2u - 1).
    # Ours rather than torch.nn.init.trunc_normal_, which changed its algorithm (inverse CDF in torch
    # 2.3, rejection sampling later), so the same seed would give other weights on another torch, and
    # which took 23 s for a ResNet-50 on this 2-core CPU under load (this: 3.5 s; torchvision's own: 0.6 s).
    edge = math.erf(2.0 / math.sqrt(2.0))
    with torch.no_grad():
        return weight.uniform_(-edge, edge).erfinv_().mul_(std * math.sqrt(2.0)).clamp_(-2.0 * std, 2.0 * std)


def reference_init_(module: nn.Module) -> nn.Module:
    """The authors' initialisation (DeepMind's BYOL code, byol/utils/networks.py, built from haiku
    modules with their default initialisers): every convolution and linear weight
    :func:`truncated_normal_fan_in_`, every bias 0, every batch-norm scale 1 and offset 0, except
    the last batch-norm scale of each bottleneck residual block, 0 (haiku's ``BlockV1``
    ``batchnorm_2``, ``scale_init=zeros``; torchvision's ``zero_init_residual``). haiku's
    non-bottleneck block (ResNet-18) has no such zero, and neither has ours. In place, in module
    order (a pure function of the torch RNG state); returns ``module``."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            truncated_normal_fan_in_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.affine:
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
    for layer in module.modules():
        if isinstance(layer, torchvision.models.resnet.Bottleneck):
            nn.init.zeros_(layer.bn3.weight)
    return module


def initialise_(module: nn.Module, init: str) -> nn.Module:
    """``module`` initialised as ``init`` says: :func:`reference_init_`, or left as its
    constructors made it (``torchvision``: torchvision's ResNet initialisation, torch's defaults
    elsewhere)."""
    check_initialisation(init)
    return reference_init_(module) if init == "reference" else module


def _resnet(name: str, cifar_stem: bool) -> nn.Module:
    net = getattr(torchvision.models, name)(weights=None)
    if cifar_stem:
        # 32 px images: a 7x7 stride-2 stem and max-pool would leave 1x1 maps after layer4.
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()  # the representation is the average-pooled layer4 output
    return net


class SmallConvNet(nn.Module):
    """Four 3x3 convolution blocks with batch norm, then global average pooling.

    Ours because torchvision has no encoder small enough to pretrain in minutes on a laptop CPU;
    it exists for the offline default (``config/local-digits.yaml``) and for tests.
    """

    def __init__(self, width: int = 32):
        super().__init__()
        layers = []
        channels = 3
        for multiplier, stride in ((1, 1), (2, 2), (4, 2), (8, 2)):
            layers += [
                nn.Conv2d(channels, width * multiplier, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(width * multiplier),
                nn.ReLU(inplace=True),
            ]
            channels = width * multiplier
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_size = channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.features(images)), 1)


BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(lambda: _resnet("resnet18", False), 512, "torchvision ResNet-18"),
    "resnet18_cifar": BackboneSpec(lambda: _resnet("resnet18", True), 512,
                                   "ResNet-18 with a 3x3 stride-1 stem and no max-pool, for 32 px images"),
    "resnet50": BackboneSpec(lambda: _resnet("resnet50", False), 2048, "torchvision ResNet-50 (the paper's)"),
    "resnet50_cifar": BackboneSpec(lambda: _resnet("resnet50", True), 2048,
                                   "ResNet-50 with a 3x3 stride-1 stem and no max-pool, for 32 px images"),
    "small_cnn": BackboneSpec(lambda: SmallConvNet(32), 256, "4-layer CNN for quick CPU runs"),
}


def check_backbone_name(name: str) -> None:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(sorted(BACKBONES))}")


def build_backbone(name: str, weights_path: Optional[str] = None, init: str = "reference") -> nn.Module:
    """Builds backbone ``name``, randomly initialised (``init``: :func:`initialise_`) or loaded
    (strictly) from ``weights_path``.

    ``weights_path`` holds a plain ``state_dict`` (for example a torchvision checkpoint file, or an
    encoder exported by ``evaluate_result.py --export-encoder``); a classifier ``fc.*`` is dropped.
    """
    check_backbone_name(name)
    net = initialise_(BACKBONES[name].build(), init)
    if weights_path:
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(f"backbone weights file {weights_path!r} does not exist")
        import pickle

        try:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
            reason = " ".join(str(error).split())[:300]
            raise InputError(f"backbone weights file {weights_path!r} cannot be loaded as plain tensors "
                             f"(weights_only): {reason}; give a state_dict saved with torch.save") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise InputError(f"backbone weights {weights_path!r} hold a {type(state).__name__}, not a state_dict")
        state = {key: value for key, value in state.items() if not key.startswith("fc.")}
        load_weights(net, name, state, f"backbone weights file {weights_path!r}")
    return net


def load_weights(net: nn.Module, name: str, state: dict, source: str) -> None:
    """Loads ``state`` into backbone ``net`` (registry name ``name``) strictly; anything missing,
    unexpected or of another shape gets one ValueError naming ``source`` and the first offenders,
    instead of torch's partial load or its multi-line shape report."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{key} {tuple(getattr(state[key], 'shape', ()))} (model {tuple(value.shape)})"
             for key, value in own.items()
             if key in state and tuple(getattr(state[key], "shape", ())) != tuple(value.shape)]
    if missing or unexpected or wrong:
        raise InputError(f"{source} does not fit backbone {name!r}: missing keys {missing[:5]}, "
                         f"unexpected keys {unexpected[:5]}, shapes differ for {wrong[:5]}")
    net.load_state_dict(state, strict=True)


def feature_size(name: str) -> int:
    check_backbone_name(name)
    return BACKBONES[name].feature_size
