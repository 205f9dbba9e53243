"""Constituent models: torchvision's ResNet-18 adapted to small images."""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from .errors import UsageError

ARCHS = ("resnet18",)


def build_model(arch: str, channels: int, classes: int) -> nn.Module:
    """ResNet-18 with a 3x3 stride-1 stem and no max-pool, as is usual for 8x8 to 32x32 inputs:
    the ImageNet stem (7x7 stride 2, then max-pool) would shrink a 28x28 image to 7x7 at once."""
    if arch != "resnet18":
        raise UsageError(f"unknown architecture {arch!r}: use one of {', '.join(ARCHS)}")
    model = torchvision.models.resnet18(num_classes=classes)
    model.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (0..255), or floats in [0, 1], to the network's input range [-1, 1].

    The normalisation is fixed rather than computed from the training set: statistics of the
    data would carry a trace of samples that are later deleted.
    """
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return x.sub_(0.5).div_(0.5) if x is not images else (x - 0.5) / 0.5
