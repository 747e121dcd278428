"""A small ResNet family for image classification (pre-activation-free, BatchNorm, basic blocks)."""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (1x1 projection when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem conv, then stages of basic blocks that halve resolution and double width, then a linear head."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32,
                 blocks_per_stage: tuple[int, ...] = (1, 1, 1)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        stages, cin = [], width
        for i, n in enumerate(blocks_per_stage):
            cout = width * 2 ** i
            for j in range(n):
                stages.append(BasicBlock(cin, cout, stride=2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def resnet_small(in_channels: int, num_classes: int, width: int = 32, depth: int = 1) -> ResNet:
    """Three stages (width, 2*width, 4*width) of `depth` blocks: ~0.3 M params at width 32, depth 1."""
    return ResNet(in_channels, num_classes, width, (depth,) * 3)


def resnet18(in_channels: int, num_classes: int, width: int = 64, depth: int = 2) -> ResNet:
    """The ResNet-18 layout (four stages of two blocks) with a 3x3 stem for small images."""
    return ResNet(in_channels, num_classes, width, (2, 2, 2, 2))
