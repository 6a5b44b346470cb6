"""Networks of the two spaces: the NAS-Bench-201 cell network and a small 3-D CNN with searched stages.

NAS-Bench-201 (arXiv 2001.00326): a 3x3 conv stem, then 3 stages of ``cells_per_stage`` cells at C, 2C, 4C
channels joined by ResNet basic blocks with stride 2, then BN-ReLU, global pooling and a linear classifier.
In a cell, node j = sum over i < j of op_ij(node i); convolutions are ReLU-Conv-BN.

The video network follows AutoX3D's per-stage decisions (block type, width, expansion ratio, attention):
a 3-D stem, one searched block per stage (each stage after the first halves the spatial size), pooling, head.
"""

from __future__ import annotations

import torch
from torch import nn

from jobs.nas.config import Nb201SpaceConfig, X3dSpaceConfig
from jobs.nas.space import NB201_EDGES, Nb201Space, Space, X3dSpace


class ReLUConvBN(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1):
        super().__init__(nn.ReLU(), nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out))


class Zero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul(0.0)


def nb201_op(name: str, channels: int) -> nn.Module:
    if name == "none":
        return Zero()
    if name == "skip_connect":
        return nn.Identity()
    if name == "nor_conv_1x1":
        return ReLUConvBN(channels, channels, 1)
    if name == "nor_conv_3x3":
        return ReLUConvBN(channels, channels, 3)
    assert name == "avg_pool_3x3", name
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class Cell(nn.Module):
    def __init__(self, ops: list[str], channels: int):
        super().__init__()
        self.edges = nn.ModuleList(nb201_op(op, channels) for op in ops)  # in NB201_EDGES order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes = [x]
        for node in (1, 2, 3):
            nodes.append(sum(edge(nodes[src]) for edge, (to, src) in zip(self.edges, NB201_EDGES) if to == node))
        return nodes[3]


class ResidualReduction(nn.Module):
    """NAS-Bench-201's ResNet basic block between stages: stride 2, channels doubled."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv_a = ReLUConvBN(c_in, c_out, 3, stride=2)
        self.conv_b = ReLUConvBN(c_out, c_out, 3)
        self.shortcut = nn.Sequential(nn.AvgPool2d(2, stride=2), nn.Conv2d(c_in, c_out, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.conv_b(self.conv_a(x))


class CellNetwork(nn.Module):
    def __init__(self, ops: list[str], cfg: Nb201SpaceConfig, in_channels: int, num_classes: int):
        super().__init__()
        c = cfg.channels
        layers: list[nn.Module] = [nn.Conv2d(in_channels, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)]
        for stage in range(3):
            if stage:
                layers.append(ResidualReduction(c, 2 * c))
                c *= 2
            layers += [Cell(ops, c) for _ in range(cfg.cells_per_stage)]
        self.features = nn.Sequential(*layers, nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x_BCHW).flatten(1))  # logits (B, num_classes)


def conv_bn(c_in: int, c_out: int, kernel: tuple[int, int, int], stride: tuple[int, int, int] = (1, 1, 1), groups: int = 1) -> list[nn.Module]:
    padding = tuple(k // 2 for k in kernel)
    return [nn.Conv3d(c_in, c_out, kernel, stride, padding, groups=groups, bias=False), nn.BatchNorm3d(c_out)]


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Conv3d(channels, hidden, 1), nn.ReLU(), nn.Conv3d(hidden, channels, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class VideoBlock(nn.Module):
    """One searched stage: ``block`` with inner width ``width * expansion``, optional SE, residual."""

    def __init__(self, block: str, c_in: int, width: int, expansion: int, attention: str, spatial_stride: int, se_reduction: int):
        super().__init__()
        inner, stride = width * expansion, (1, spatial_stride, spatial_stride)
        if block == "x3d":  # inverted bottleneck with a depthwise 3x3x3 conv, as in X3D
            body = [*conv_bn(c_in, inner, (1, 1, 1)), nn.ReLU(), *conv_bn(inner, inner, (3, 3, 3), stride, groups=inner), nn.ReLU()]
        elif block == "res":  # full 3x3x3 convs
            body = [*conv_bn(c_in, inner, (3, 3, 3), stride), nn.ReLU()]
        else:  # r21d: spatial 1x3x3 then temporal 3x1x1
            assert block == "r21d", block
            body = [*conv_bn(c_in, inner, (1, 3, 3), stride), nn.ReLU(), *conv_bn(inner, inner, (3, 1, 1)), nn.ReLU()]
        if attention == "se":
            body.append(SqueezeExcite(inner, se_reduction))
        project = conv_bn(inner, width, (1, 1, 1) if block == "x3d" else (3, 3, 3) if block == "res" else (1, 3, 3))
        self.body = nn.Sequential(*body, *project)
        same = c_in == width and spatial_stride == 1
        self.shortcut = nn.Identity() if same else nn.Sequential(*conv_bn(c_in, width, (1, 1, 1), stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.shortcut(x) + self.body(x))


class VideoNetwork(nn.Module):
    def __init__(self, stages: list[dict[str, str]], cfg: X3dSpaceConfig, in_channels: int, num_classes: int):
        super().__init__()
        layers: list[nn.Module] = [*conv_bn(in_channels, cfg.stem_channels, (1, 3, 3)), nn.ReLU()]  # spatial-only stem, as X3D
        c = cfg.stem_channels
        for i, stage in enumerate(stages):
            width = int(stage["width"])
            layers.append(VideoBlock(stage["block"], c, width, int(stage["expansion"]), stage["attention"], 2 if i else 1, cfg.se_reduction))
            c = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool3d(1))
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x_BCTHW).flatten(1))  # logits (B, num_classes)


def build_network(space: Space, arch: tuple[int, ...], cfg: Nb201SpaceConfig | X3dSpaceConfig, *, in_channels: int, num_classes: int) -> nn.Module:
    if isinstance(space, Nb201Space):
        return CellNetwork(list(space.choices(arch).values()), cfg, in_channels, num_classes)
    assert isinstance(space, X3dSpace)
    return VideoNetwork(space.stages(arch), cfg, in_channels, num_classes)


def input_shape(space: Space, *, channels: int, image_size: int, num_frames: int) -> tuple[int, ...]:
    """One sample's shape: (C, H, W) for cells, (C, T, H, W) for clips."""
    return (channels, image_size, image_size) if isinstance(space, Nb201Space) else (channels, num_frames, image_size, image_size)


class SpaceError(ValueError):
    """A space config that cannot build a working network."""


def check_space(space: Space, cfg, *, channels: int, image_size: int, num_frames: int, num_classes: int) -> None:
    """Build networks that together use every choice and run a forward/backward pass on a batch of 2,
    so a space that cannot build a network is refused before any trial starts."""
    shape = input_shape(space, channels=channels, image_size=image_size, num_frames=num_frames)
    for arch in space.probe_archs():
        try:
            net = build_network(space, arch, cfg, in_channels=channels, num_classes=num_classes)
            logits = net(torch.zeros(2, *shape))
            if logits.shape != (2, num_classes):
                raise RuntimeError(f"the network returned logits of shape {tuple(logits.shape)}, not (2, {num_classes})")
            logits.sum().backward()
        except Exception as error:  # noqa: BLE001 - any failure here means the config cannot work
            raise SpaceError(
                f"the {space.name} space cannot build a network for input {shape}: {space.format(arch)} fails with "
                f"{type(error).__name__}: {error}. Check the space settings against the input size."
            ) from None
