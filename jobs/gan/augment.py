"""Adaptive discriminator augmentation (Karras et al. 2020): every image D sees, real or fake, is augmented
with probability p per operation, differentiably (G learns through it, R1 differentiates through it).

The operations are the cheap DiffAugment-style subset METHODS.md 4.5 names as the CPU stand-in for ADA's
full 'bgc' pipeline: x-flip, integer translation (zero padded) and colour (brightness, contrast, saturation,
with ADA's strengths). The heuristic r_t = E[sign(D(real))] moves p towards ``target`` every ``interval``
minibatches by sign(r_t - target) * images / (kimg * 1000).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from jobs.gan.config import AdaConfig
from labtrain import dist


def augment(x: torch.Tensor, p: torch.Tensor | float, cfg: AdaConfig) -> torch.Tensor:
    """``x`` (B, 3, H, W) in [-1, 1] with each operation applied to each image with probability ``p``."""
    if not cfg.enabled:
        return x
    B, _, H, W = x.shape
    device = x.device

    def chosen() -> torch.Tensor:
        return (torch.rand(B, 1, 1, 1, device=device) < p).to(x.dtype)

    flip = chosen()
    x = flip * x.flip(3) + (1 - flip) * x
    if cfg.translation > 0:
        use = chosen().view(B, 1)
        shift = torch.round((torch.rand(B, 2, device=device) * 2 - 1) * cfg.translation * torch.tensor([W, H], device=device)) * use
        # grid_sample at whole-pixel offsets: an exact translation, zeros where the image moved away
        theta = torch.zeros(B, 2, 3, device=device, dtype=x.dtype)
        theta[:, 0, 0] = theta[:, 1, 1] = 1
        theta[:, 0, 2] = -shift[:, 0] * 2 / W
        theta[:, 1, 2] = -shift[:, 1] * 2 / H
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    if cfg.color:
        x = x + torch.randn(B, 1, 1, 1, device=device) * 0.2 * chosen()  # brightness
        mean = x.mean([1, 2, 3], keepdim=True)
        contrast = torch.exp2(torch.randn(B, 1, 1, 1, device=device) * 0.5 * chosen())
        x = (x - mean) * contrast + mean
        gray = x.mean(1, keepdim=True)
        saturation = torch.exp2(torch.randn(B, 1, 1, 1, device=device) * chosen())
        x = (x - gray) * saturation + gray
    return x


class AdaState(nn.Module):
    """p and the running sum of sign(D(real)) since the last adjustment: buffers, the same on every rank
    (the signs are all-reduced each step), carried by the session into every checkpoint."""

    def __init__(self, cfg: AdaConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("p", torch.tensor(float(cfg.p_init)))
        self.register_buffer("signs", torch.zeros(2))  # sum of sign(D(real)), count

    @torch.no_grad()
    def observe(self, real_logits: torch.Tensor) -> None:
        stats = torch.stack([real_logits.detach().sign().sum(), torch.tensor(float(real_logits.numel()), device=real_logits.device)])
        if dist.is_initialized():
            torch.distributed.all_reduce(stats)
        self.signs += stats.to(self.signs.device)

    @torch.no_grad()
    def maybe_adjust(self, step: int) -> None:
        """After minibatch ``step`` (1-based): every ``interval`` steps, move p by the heuristic."""
        c = self.cfg
        if not (c.enabled and c.adaptive) or step % c.interval:
            return
        r_t = self.signs[0] / self.signs[1].clamp(min=1)
        adjust = torch.sign(r_t - c.target) * self.signs[1] / (c.kimg * 1000)
        self.p.copy_((self.p + adjust).clamp(0, 1))
        self.signs.zero_()

    @property
    def r_t(self) -> torch.Tensor:
        return self.signs[0] / self.signs[1].clamp(min=1)
