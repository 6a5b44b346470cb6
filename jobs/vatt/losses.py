"""VATT's contrastive losses and the two harmonization techniques of arXiv 2211.02077.

NCE (video-audio) and MIL-NCE (video-text) as VATT's SymmetricNCE: L2-normalized embeddings, temperature
tau, negatives from the whole global batch (a differentiable all-gather across ranks).

Harmonization works on per-sample gradients w.r.t. the shared representation Z (the pooled video feature
both losses read): g_va,i and g_vt,i, sample i's own gradients of each loss w.r.t. Z_i (its loss with the
other samples' embeddings held constant), come from ``autograd.grad`` calls through the small heads only,
never B backward passes. Their cosine c_i is the conflict score.
- realignment (PCGrad): where c_i < 0 each gradient loses its component along the other, and the backbone
  receives g_va,i' + g_vt,i' for sample i;
- curriculum: 'hard' keeps sample i while c_i >= gamma(t), gamma falling linearly from gamma_start to -1
  over the first ``anneal_fraction`` of training; 'soft' weighs it by sigmoid(kappa * c_i). Loss and
  gradients are renormalized by the kept weight.
Realignment reaches the backbone through a term whose value is zero, so every strategy (DDP, DeepSpeed,
Accelerate) still takes one scalar loss and runs one backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from jobs.vatt.config import HarmonizeConfig
from jobs.vatt.model import Embeddings
from labtrain import dist


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's rows (all_reduce, then slice):
    a sample's gradient then includes the terms where it was another rank's negative."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.rank(), len(x)
        parts = [torch.empty_like(x) for _ in range(dist.world_size())]
        torch.distributed.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The global batch of ``x`` (gradients flow back to each rank's part) and this rank's offset in it."""
    if not dist.is_initialized() or dist.world_size() == 1:
        return x, 0
    return _GatherWithGrad.apply(x), dist.rank() * len(x)


def symmetric_nce(a_BND: torch.Tensor, b_BMD: torch.Tensor, temperature: float, *, own_only: bool = False) -> torch.Tensor:
    """Per-sample SymmetricNCE, (B,). N, M > 1 are several candidates per clip (MIL-NCE).

    ``own_only``: each sample's loss with the other samples' embeddings held constant (stop-gradient
    negatives), so the gradient of the sum w.r.t. row i is sample i's own gradient, with none of the terms
    where i serves as another sample's negative.
    """
    a, b = F.normalize(a_BND, dim=-1), F.normalize(b_BMD, dim=-1)
    if own_only:
        with torch.no_grad():
            a_all, offset = gather(a.detach())
            b_all, _ = gather(b.detach())
    else:
        a_all, offset = gather(a)
        b_all, _ = gather(b)
    idx = torch.arange(len(a), device=a.device)

    def one_way(q_BND, k_all_CMD, k_BMD):
        logits = torch.einsum("bnd,cmd->bcnm", q_BND, k_all_CMD) / temperature  # (B, C, N, M)
        if own_only:  # the positive pair stays live on both sides
            logits = logits.index_put((idx, offset + idx), torch.einsum("bnd,bmd->bnm", q_BND, k_BMD) / temperature)
        flat = logits.flatten(2)
        positive = torch.logsumexp(flat[idx, offset + idx], dim=-1)
        return torch.logsumexp(flat.flatten(1), dim=-1) - positive

    return one_way(a, b_all, b) + one_way(b, a_all, a)


def cosine_rows(x_BD: torch.Tensor, y_BD: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(x_BD, y_BD, dim=1, eps=1e-12)


def realign(g_va: torch.Tensor, g_vt: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """PCGrad on each sample's pair: project conflicting gradients, using the original vectors."""
    dot = (g_va * g_vt).sum(1, keepdim=True)
    va = g_va - dot / g_vt.pow(2).sum(1, keepdim=True).clamp_min(1e-20) * g_vt
    vt = g_vt - dot / g_va.pow(2).sum(1, keepdim=True).clamp_min(1e-20) * g_va
    return torch.where((cos < 0).unsqueeze(1), va + vt, g_va + g_vt)


def curriculum_threshold(cfg: HarmonizeConfig, step: int, total_steps: int) -> float:
    progress = min(1.0, step / max(1.0, cfg.anneal_fraction * total_steps))
    return cfg.gamma_start + (-1.0 - cfg.gamma_start) * progress


def sample_weights(cfg: HarmonizeConfig, cos: torch.Tensor, step: int, total_steps: int) -> torch.Tensor:
    if cfg.curriculum == "hard":
        return (cos >= curriculum_threshold(cfg, step, total_steps)).float()
    if cfg.curriculum == "soft":
        return torch.sigmoid(cfg.kappa * cos)
    return torch.ones_like(cos)


@dataclass
class StepStats:
    loss_va: float
    loss_vt: float
    cos: torch.Tensor | None = None  # (B,) conflict scores, when measured
    kept: float = 1.0

    @property
    def conflict_rate(self) -> float:
        return float((self.cos < 0).float().mean()) if self.cos is not None else float("nan")

    @property
    def mean_cos(self) -> float:
        return float(self.cos.mean()) if self.cos is not None else float("nan")


def per_sample_gradients(emb: Embeddings, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's own gradient of each loss w.r.t. its row of Z (stop-gradient negatives), (B, D) each.
    Two ``autograd.grad`` calls through the heads only: Z is an intermediate tensor, nothing below it runs."""
    Z = emb.video_BD
    own_va = symmetric_nce(emb.video_va.unsqueeze(1), emb.audio_va.unsqueeze(1), temperature, own_only=True).mean()
    own_vt = symmetric_nce(emb.video_vat.unsqueeze(1), emb.text_vat.unsqueeze(1), temperature, own_only=True).mean()
    g_va, = torch.autograd.grad(own_va, Z, retain_graph=True)
    g_vt, = torch.autograd.grad(own_vt, Z, retain_graph=True)
    return g_va, g_vt


def objective(emb: Embeddings, cfg: HarmonizeConfig, temperature: float, *, step: int, total_steps: int, measure: bool = True) -> tuple[torch.Tensor, StepStats]:
    """The scalar to backpropagate, and the step's statistics.

    ``measure`` computes the per-sample gradients and conflict scores (always, when harmonization is on).
    The loss is VATT's, each sample weighted by the curriculum; realignment adds, per sample, the change
    PCGrad makes to its own gradients, realign(own_va,i, own_vt,i) - own_va,i - own_vt,i, through a term of
    value zero, so the rest of the full gradient (i as another sample's negative) passes through unchanged
    and every strategy still runs one backward pass on one scalar.
    """
    l_va = symmetric_nce(emb.video_va.unsqueeze(1), emb.audio_va.unsqueeze(1), temperature)  # (B,)
    l_vt = symmetric_nce(emb.video_vat.unsqueeze(1), emb.text_vat.unsqueeze(1), temperature)
    stats = StepStats(float(l_va.mean().detach()), float(l_vt.mean().detach()))
    if not (measure or cfg.enabled):
        return (l_va.mean() + l_vt.mean()) / 2, stats

    own_va, own_vt = per_sample_gradients(emb, temperature)
    cos = cosine_rows(own_va, own_vt).detach()
    stats.cos = cos
    if not cfg.enabled:  # measured only: the plain objective
        return (l_va.mean() + l_vt.mean()) / 2, stats
    weights = sample_weights(cfg, cos, step, total_steps)
    stats.kept = float(weights.mean())
    scale = weights / weights.mean().clamp_min(1e-6)  # renormalize by the kept weight
    loss = (scale * (l_va + l_vt)).mean() / 2
    if cfg.realign:
        change = (realign(own_va, own_vt, cos) - own_va - own_vt) * scale.unsqueeze(1) / 2
        push = (emb.video_BD * change.detach()).sum()
        loss = loss + push - push.detach()
    return loss, stats
