"""A small CNN: two conv blocks, global average pooling, a linear classifier."""

from __future__ import annotations

import torch
from torch import nn


class ShapesNet(nn.Module):
    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x_B1HW: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x_B1HW).flatten(1))  # logits (B, num_classes)
