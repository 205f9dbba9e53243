"""Constituent models: torchvision's ResNet-18 adapted to small images."""
from __future__ import annotations

import torch
from torch import nn

from .errors import UsageError

ARCHS = ("resnet18",)


def build_model(arch: str, channels: int, classes: int, width: int = 64) -> nn.Module:
    """ResNet-18 with a 3x3 stride-1 stem and no max-pool, as is usual for 8x8 to 32x32 inputs:
    the ImageNet stem (7x7 stride 2, then max-pool) would shrink a 28x28 image to 7x7 at once.

    `width` is the channel count of the stem and layer1 (torchvision's is 64; layers 2-4 double
    it each time). A narrower ResNet-18 has the same depth and topology at a fraction of the cost:
    width 16 has 1/16 of the weights (the test suite uses it to keep checkpoints at ~6 MB)."""
    if arch != "resnet18":
        raise UsageError(f"unknown architecture {arch!r}: use one of {', '.join(ARCHS)}")
    if width < 1:
        raise UsageError(f"--width must be at least 1, got {width}")
    import torchvision  # here, not at the top: it costs about 2 s of start-up (it loads torch._dynamo),
    # and a forget on a frozen trunk's fc head never builds the network (sisa.backbone.build_head)

    model = torchvision.models.resnet18(num_classes=classes)
    if width != 64:
        from torchvision.models.resnet import BasicBlock

        model.inplanes = width
        for i in range(1, 5):
            layer = model._make_layer(BasicBlock, width * 2 ** (i - 1), 2, stride=1 if i == 1 else 2)
            for m in layer.modules():  # torchvision's own initialisation of these layers
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            setattr(model, f"layer{i}", layer)
        model.fc = nn.Linear(width * 8, classes)
    model.conv1 = nn.Conv2d(channels, width, kernel_size=3, stride=1, padding=1, bias=False)
    model.bn1 = nn.BatchNorm2d(width) if width != 64 else model.bn1
    model.maxpool = nn.Identity()
    return model


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (0..255), or floats in [0, 1], to the network's input range [-1, 1].

    The normalisation is fixed rather than computed from the training set: statistics of the
    data would carry a trace of samples that are later deleted.
    """
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return x.sub_(0.5).div_(0.5) if x is not images else (x - 0.5) / 0.5
