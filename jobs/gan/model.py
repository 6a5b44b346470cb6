"""StyleGAN2 at any size (Karras et al. 2020, config-f layout), written with torch.nn.

G: z -> mapping MLP (equalised lr x ``mapping_lr_mul``) -> w; synthesis from a learned 4x4 constant, two
modulated 3x3 convolutions (weight demodulation) with per-pixel noise per resolution, skip-connected toRGB
(modulated 1x1, no demodulation). D: fromRGB, residual blocks that
halve the resolution, minibatch standard deviation, a 3x3 convolution at 4x4 whose map is InsGen's features,
and a linear head to one logit. Every weight is stored at unit variance and scaled at run time (equalised
learning rate).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from jobs.gan.config import ModelConfig

SQRT2 = math.sqrt(2)


def channels(base: int, floor: int, resolution: int) -> dict[int, int]:
    """Channels at each resolution 4, 8, ..., ``resolution``: ``base`` at 4x4, halved per doubling, at least ``floor``."""
    out, res = {}, 4
    while res <= resolution:
        out[res] = max(base >> int(math.log2(res // 4)), floor)
        res *= 2
    return out


class EqualLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, *, bias_init: float = 0.0, lr_mul: float = 1.0, activate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_features)
        self.lr_mul = lr_mul
        self.activate = activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)
        return F.leaky_relu(x, 0.2) * SQRT2 if self.activate else x


class EqualConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel: int, *, bias: bool = True, activate: bool = True, down: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.scale = 1 / math.sqrt(in_channels * kernel * kernel)
        self.activate, self.down, self.padding = activate, down, kernel // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)
        if self.down:
            x = F.avg_pool2d(x, 2)
        return F.leaky_relu(x, 0.2) * SQRT2 if self.activate else x


class ModulatedConv(nn.Module):
    """A convolution whose input channels are scaled per sample by a style from w, then demodulated."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, w_dim: int, *, demodulate: bool = True, up: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel))
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.scale = 1 / math.sqrt(in_channels * kernel * kernel)
        self.demodulate, self.up, self.padding = demodulate, up, kernel // 2

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        style = self.affine(w)  # (B, C_in)
        weight = self.weight[None] * self.scale * style[:, None, :, None, None]  # (B, C_out, C_in, k, k)
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.square().sum([2, 3, 4], keepdim=True) + 1e-8)
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            H, W = H * 2, W * 2
        out = F.conv2d(x.reshape(1, B * C, H, W), weight.reshape(-1, C, *weight.shape[3:]), padding=self.padding, groups=B)  # grouped: one conv per sample
        return out.reshape(B, -1, H, W)


class StyleLayer(nn.Module):
    """Modulated 3x3 convolution, per-pixel noise with a learned strength, bias, leaky ReLU."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, *, up: bool = False):
        super().__init__()
        self.conv = ModulatedConv(in_channels, out_channels, 3, w_dim, up=up)
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        x = self.conv(x, w)
        if noise is None:
            noise = torch.randn(x.shape[0], 1, x.shape[2], x.shape[3], device=x.device, dtype=x.dtype)
        x = x + noise * self.noise_strength
        return F.leaky_relu(x + self.bias[None, :, None, None], 0.2) * SQRT2


class ToRGB(nn.Module):
    def __init__(self, in_channels: int, w_dim: int):
        super().__init__()
        self.conv = ModulatedConv(in_channels, 3, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor, w: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        out = self.conv(x, w) + self.bias[None, :, None, None]
        if skip is not None:
            out = out + F.interpolate(skip, scale_factor=2, mode="bilinear", align_corners=False)
        return out


class Generator(nn.Module):
    def __init__(self, cfg: ModelConfig, resolution: int):
        super().__init__()
        self.cfg = cfg
        self.z_dim, self.w_dim = cfg.z_dim, cfg.w_dim
        self.mapping = nn.Sequential(*[EqualLinear(cfg.z_dim if i == 0 else cfg.w_dim, cfg.w_dim, lr_mul=cfg.mapping_lr_mul, activate=True)
                                       for i in range(cfg.mapping_layers)])
        ch = channels(cfg.g_channels, cfg.min_channels, resolution)
        self.const = nn.Parameter(torch.randn(ch[4], 4, 4))
        self.layers = nn.ModuleList([StyleLayer(ch[4], ch[4], cfg.w_dim)])
        self.to_rgbs = nn.ModuleList([ToRGB(ch[4], cfg.w_dim)])
        for res in list(ch)[1:]:
            self.layers.append(StyleLayer(ch[res // 2], ch[res], cfg.w_dim, up=True))
            self.layers.append(StyleLayer(ch[res], ch[res], cfg.w_dim))
            self.to_rgbs.append(ToRGB(ch[res], cfg.w_dim))
        self.num_ws = len(self.layers) + 1  # one w per layer, the last toRGB's too

    def map(self, z: torch.Tensor) -> torch.Tensor:
        z = z * torch.rsqrt(z.square().mean(1, keepdim=True) + 1e-8)  # 2nd-moment normalisation
        return self.mapping(z)

    def synthesize(self, ws: torch.Tensor) -> torch.Tensor:
        """``ws`` (B, num_ws, w_dim) -> images (B, 3, R, R), roughly in [-1, 1]."""
        x = self.const[None].expand(ws.shape[0], -1, -1, -1)
        x = self.layers[0](x, ws[:, 0])
        rgb = self.to_rgbs[0](x, ws[:, 1], None)
        for i in range(1, len(self.to_rgbs)):
            x = self.layers[2 * i - 1](x, ws[:, 2 * i - 1])
            x = self.layers[2 * i](x, ws[:, 2 * i])
            rgb = self.to_rgbs[i](x, ws[:, 2 * i + 1], rgb)
        return rgb

    def forward(self, z: torch.Tensor, *, mixing: float = 0.0) -> torch.Tensor:
        w = self.map(z)
        ws = w[:, None].repeat(1, self.num_ws, 1)
        if mixing > 0:  # style mixing: from a random layer on, the ws of a second latent
            w2 = self.map(torch.randn_like(z))
            cut = torch.randint(1, self.num_ws, (z.shape[0], 1, 1), device=z.device)
            cut = torch.where(torch.rand(z.shape[0], 1, 1, device=z.device) < mixing, cut, torch.full_like(cut, self.num_ws))
            ws = torch.where(torch.arange(self.num_ws, device=z.device)[None, :, None] < cut, ws, w2[:, None])
        return self.synthesize(ws)


class MinibatchStd(nn.Module):
    def __init__(self, group: int):
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        g = min(self.group, B)
        y = x.reshape(g, -1, C, H, W)
        y = (y.var(0, unbiased=False) + 1e-8).sqrt().mean([1, 2, 3])  # (B/g,)
        y = y.reshape(-1, 1, 1, 1).repeat(g, 1, H, W)
        return torch.cat([x, y], 1)


class DBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv0 = EqualConv(in_channels, in_channels, 3)
        self.conv1 = EqualConv(in_channels, out_channels, 3, down=True)
        self.skip = EqualConv(in_channels, out_channels, 1, bias=False, activate=False, down=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.skip(x) + self.conv1(self.conv0(x))) / SQRT2


class Discriminator(nn.Module):
    """``forward(x)`` -> (logits (B,), features (B, C4) pooled from the 4x4 map: InsGen's)."""

    def __init__(self, cfg: ModelConfig, resolution: int):
        super().__init__()
        ch = channels(cfg.d_channels, cfg.min_channels, resolution)
        self.from_rgb = EqualConv(3, ch[resolution], 1)
        self.blocks = nn.Sequential(*[DBlock(ch[res], ch[res // 2]) for res in sorted(ch, reverse=True) if res > 4])
        self.mbstd = MinibatchStd(cfg.mbstd_group)
        self.conv = EqualConv(ch[4] + 1, ch[4], 3)
        self.fc = EqualLinear(ch[4] * 16, ch[4], activate=True)
        self.out = EqualLinear(ch[4], 1)
        self.feature_dim = ch[4]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv(self.mbstd(self.blocks(self.from_rgb(x))))
        features = x.mean([2, 3])
        return self.out(self.fc(x.flatten(1))).squeeze(1), features


class Head(nn.Module):
    """InsGen's projection: feat -> feat -> ReLU -> dim, L2-normalised."""

    def __init__(self, features: int, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, features), nn.ReLU(), nn.Linear(features, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=1)
