"""A multilayer perceptron: the network of the energy-efficient plasticity papers."""

from __future__ import annotations

import math

import torch
from torch import nn


class MLP(nn.Module):
    """Flatten, `depth` hidden ReLU layers of `width` units, linear readout."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, width: int = 100, depth: int = 1) -> None:
        super().__init__()
        layers, cin = [nn.Flatten()], math.prod(in_shape)
        for _ in range(depth):
            layers += [nn.Linear(cin, width), nn.ReLU()]
            cin = width
        layers.append(nn.Linear(cin, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
