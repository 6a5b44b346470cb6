"""VATT's contrastive losses and the two harmonization techniques of arXiv 2211.02077.

NCE (video-audio) and MIL-NCE (video-text) as VATT's SymmetricNCE: L2-normalized embeddings, temperature
tau, negatives from the whole global batch (a differentiable all-gather across ranks).

Harmonization works on per-sample gradients w.r.t. the shared representation Z (the pooled video feature
both losses read): g_va,i and g_vt,i, sample i's own gradients of each loss w.r.t. Z_i (its loss with the
other samples' embeddings held constant), come from ``autograd.grad`` calls through the small heads only,
never B backward passes. Their cosine c_i is the conflict score.
- realignment (PCGrad): where c_i < 0 each gradient loses its component along the other, and the backbone
  receives g_va,i' + g_vt,i' for sample i;
- curriculum: 'share' trains plainly for a warm-up, then drops each batch's lowest-scoring share (by the
  cosine, the per-pair loss, a random draw, or, as the oracle, the planted flags), then keeps everything;
  'hard' keeps sample i while c_i >= gamma(t), gamma falling linearly from gamma_start to -1 over the first
  ``anneal_fraction`` of training; 'soft' weighs it by sigmoid(kappa * c_i). Weights are per pair (video-audio,
  video-text), and each loss is renormalized by its kept weight.
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


def cosine_rows(x_B: torch.Tensor, y_B: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(x_B.flatten(1), y_B.flatten(1), dim=1, eps=1e-12)


def realign(g_va: torch.Tensor, g_vt: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """PCGrad on each sample's pair: project conflicting gradients, using the original vectors."""
    shape = g_va.shape
    g_va, g_vt = g_va.flatten(1), g_vt.flatten(1)
    dot = (g_va * g_vt).sum(1, keepdim=True)
    va = g_va - dot / g_vt.pow(2).sum(1, keepdim=True).clamp_min(1e-20) * g_vt
    vt = g_vt - dot / g_va.pow(2).sum(1, keepdim=True).clamp_min(1e-20) * g_va
    return torch.where((cos < 0).unsqueeze(1), va + vt, g_va + g_vt).view(shape)


def curriculum_threshold(cfg: HarmonizeConfig, step: int, total_steps: int) -> float:
    progress = min(1.0, step / max(1.0, cfg.anneal_fraction * total_steps))
    return cfg.gamma_start + (-1.0 - cfg.gamma_start) * progress


def dropping(cfg: HarmonizeConfig, step: int, total_steps: int) -> bool:
    """Whether the 'share' curriculum drops at this step (after its warm-up, before drop_until)."""
    return cfg.warmup_fraction * total_steps <= step < cfg.drop_until * total_steps


def curriculum_active(cfg: HarmonizeConfig, step: int, total_steps: int) -> bool:
    """Whether the curriculum may drop anything at this step (where its dropped set is scored against the base rate)."""
    if cfg.curriculum == "none":
        return False
    return cfg.curriculum != "share" or cfg.score == "oracle" or dropping(cfg, step, total_steps)


def _zscore(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std().clamp_min(1e-6) if len(x) > 1 else torch.zeros_like(x)


def pair_weights(cfg: HarmonizeConfig, *, step: int, total_steps: int, cos: torch.Tensor | None, l_va: torch.Tensor, l_vt: torch.Tensor,
                 text_swapped: torch.Tensor | None = None, audio_swapped: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The curriculum's weight of each sample's video-audio and video-text pair, (B,) each.

    'share' drops n = round(drop_share * B) pairs' worth per batch: with ``unit: triplet`` the n triplets ranked
    worst (lowest cosine, highest summed loss z-score, or a random draw), both pairs each; with ``unit: pair``
    n pairs (cosine: of the n lowest-cosine triplets, the pair whose loss z-score is higher; loss: the n highest
    z-scores of all 2B pairs; random: n of the 2B). The 'oracle' score drops exactly the planted swapped pairs
    at every step."""
    ones = torch.ones_like(l_va)
    if cfg.curriculum == "hard":
        w = (cos >= curriculum_threshold(cfg, step, total_steps)).float()
        return w, w
    if cfg.curriculum == "soft":
        w = torch.sigmoid(cfg.kappa * cos)
        return w, w
    if cfg.curriculum == "none":
        return ones, ones
    if cfg.score == "oracle":
        if text_swapped is None or audio_swapped is None:
            raise ValueError("harmonize.score=oracle needs the planted swap flags (text_swapped, audio_swapped) of the batch")
        return 1.0 - audio_swapped.float(), 1.0 - text_swapped.float()
    B = len(l_va)
    n = round(cfg.drop_share * B)
    if n == 0 or not dropping(cfg, step, total_steps):
        return ones, ones
    z_va, z_vt = _zscore(l_va.detach()), _zscore(l_vt.detach())
    w = torch.ones(2, B, device=l_va.device)  # rows: va, vt
    if cfg.unit == "triplet":
        if cfg.score == "cosine":
            badness = -cos
        else:
            badness = z_va + z_vt if cfg.score == "loss" else torch.rand(B, device=l_va.device)
        w[:, badness.topk(n).indices] = 0
    elif cfg.score == "cosine":
        worst = (-cos).topk(n).indices
        w[(z_vt[worst] > z_va[worst]).long(), worst] = 0
    else:
        badness = torch.cat([z_va, z_vt]) if cfg.score == "loss" else torch.rand(2 * B, device=l_va.device)
        w.view(-1)[badness.topk(n).indices] = 0
    return w[0], w[1]


@dataclass
class StepStats:
    loss_va: torch.Tensor  # 0-dim, detached, on the device: read on logging steps only (a read is a device sync)
    loss_vt: torch.Tensor
    cos: torch.Tensor | None = None  # (B,) conflict scores, when measured
    losses: torch.Tensor | None = None  # (B,) each triplet's l_va + l_vt, detached
    w_va: torch.Tensor | None = None  # (B,) the curriculum's pair weights
    w_vt: torch.Tensor | None = None

    @property
    def kept(self) -> float:
        return float((self.w_va.mean() + self.w_vt.mean()) / 2) if self.w_va is not None else 1.0

    @property
    def conflict_rate(self) -> float:
        return float((self.cos < 0).float().mean()) if self.cos is not None else float("nan")

    @property
    def mean_cos(self) -> float:
        return float(self.cos.mean()) if self.cos is not None else float("nan")

    def signals(self) -> dict[str, torch.Tensor]:
        """The step's gauges as 0-dim device tensors: the session's logger reads them on logging steps only."""
        out = {"loss_va": self.loss_va, "loss_vt": self.loss_vt}
        out["kept"] = (self.w_va.mean() + self.w_vt.mean()).detach() / 2 if self.w_va is not None else torch.ones((), device=self.loss_va.device)
        if self.cos is not None:
            out.update(conflict_rate=(self.cos < 0).float().mean(), mean_cos=self.cos.mean())
        return out


def bag(x: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B, 1, D): one candidate; (B, K, D) stays."""
    return x if x.dim() == 3 else x.unsqueeze(1)


def target_of(emb: Embeddings, target: str = "pooled") -> torch.Tensor:
    """The shared representation Z the per-sample gradients are taken with respect to: (B, D) or (B, S, D)."""
    return emb.video_BD if target == "pooled" else emb.video_tokens_BSD


def per_sample_gradients(emb: Embeddings, temperature: float, target: str = "pooled") -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's own gradient of each loss w.r.t. its row of Z (stop-gradient negatives), shaped as Z.
    Two ``autograd.grad`` calls through the heads (and, for the last-block target, that block) only: Z is an
    intermediate tensor, nothing below it runs."""
    Z = target_of(emb, target)
    own_va = symmetric_nce(bag(emb.video_va), bag(emb.audio_va), temperature, own_only=True).mean()
    own_vt = symmetric_nce(bag(emb.video_vat), bag(emb.text_vat), temperature, own_only=True).mean()
    g_va, = torch.autograd.grad(own_va, Z, retain_graph=True)
    g_vt, = torch.autograd.grad(own_vt, Z, retain_graph=True)
    return g_va, g_vt


def objective(emb: Embeddings, cfg: HarmonizeConfig, temperature: float, *, step: int, total_steps: int, measure: bool = True,
              text_swapped: torch.Tensor | None = None, audio_swapped: torch.Tensor | None = None) -> tuple[torch.Tensor, StepStats]:
    """The scalar to backpropagate, and the step's statistics.

    ``measure`` computes the per-sample gradients and conflict scores (always, when the setting needs them).
    The loss is VATT's, each pair weighted by the curriculum and each loss renormalized by its kept weight;
    realignment adds, per sample, the change PCGrad makes to its own (weighted) gradients, realign(own_va,i,
    own_vt,i) - own_va,i - own_vt,i, through a term of value zero, so the rest of the full gradient (i as
    another sample's negative) passes through unchanged and every strategy still runs one backward pass on one
    scalar. The swap flags are read only by the oracle curriculum.
    """
    l_va = symmetric_nce(bag(emb.video_va), bag(emb.audio_va), temperature)  # (B,)
    l_vt = symmetric_nce(bag(emb.video_vat), bag(emb.text_vat), temperature)  # MIL-NCE over the candidate texts
    stats = StepStats(l_va.mean().detach(), l_vt.mean().detach(), losses=(l_va + l_vt).detach())
    own_va = own_vt = cos = None
    if measure or cfg.needs_cosine:
        own_va, own_vt = per_sample_gradients(emb, temperature, cfg.target)
        cos = stats.cos = cosine_rows(own_va, own_vt).detach()
    if not cfg.enabled:
        return (l_va.mean() + l_vt.mean()) / 2, stats
    w_va, w_vt = pair_weights(cfg, step=step, total_steps=total_steps, cos=cos, l_va=l_va, l_vt=l_vt, text_swapped=text_swapped, audio_swapped=audio_swapped)
    stats.w_va, stats.w_vt = w_va, w_vt
    s_va, s_vt = w_va / w_va.mean().clamp_min(1e-6), w_vt / w_vt.mean().clamp_min(1e-6)  # renormalize each loss by its kept weight
    loss = ((s_va * l_va).mean() + (s_vt * l_vt).mean()) / 2
    if cfg.realign:
        per_row = (-1,) + (1,) * (own_va.dim() - 1)
        va, vt = own_va * s_va.view(per_row), own_vt * s_vt.view(per_row)
        change = (realign(va, vt, cos) - va - vt) / 2
        push = (target_of(emb, cfg.target) * change.detach()).sum()
        loss = loss + push - push.detach()
    return loss, stats
