"""Encoder backbones f (section 3.3 and appendix A: ResNet-50 in the paper; ResNet-18 is common
for CIFAR-scale runs).

A registry of torchvision ResNets with random initialisation or weights from a local file, each
with a CIFAR variant (3x3 stride-1 stem, no max-pool) for 32 px images, and a small convolutional
network for quick CPU runs (the offline default). Every backbone returns the flattened
representation y (the average-pooled features); ``feature_size`` says how long it is.
"""
from __future__ import annotations

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


def build_backbone(name: str, weights_path: Optional[str] = None) -> nn.Module:
    """Builds backbone ``name``, randomly initialised or loaded (strictly) from ``weights_path``.

    ``weights_path`` holds a plain ``state_dict`` (for example a torchvision checkpoint file, or an
    encoder exported by ``evaluate_result.py --export-encoder``); a classifier ``fc.*`` is dropped.
    """
    check_backbone_name(name)
    net = BACKBONES[name].build()
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
