"""StyleGAN2-ADA's losses and InsGen's instance discrimination (METHODS.md 4.1, 4.2).

Non-saturating logistic loss: G minimises softplus(-D(G(z))); D minimises softplus(D(G(z))) + softplus(-D(x)).
Lazy R1: every ``r1_every`` minibatches, (gamma/2) * |grad_x D(x)|^2 times r1_every on the (augmented) real
images. InsGen: InfoNCE of D-feature embeddings against a momentum D's keys and a queue of negatives, for
real images (two independent augmentations) and fake ones (the positive is G(z + delta)), plus a small
generator term that asks the fake head to tell G's samples apart.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from jobs.gan.model import Discriminator, Head
from labtrain import dist


def d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-fake_logits).mean()


def r1_penalty(discriminator: nn.Module, real: torch.Tensor, augment) -> torch.Tensor:
    """|grad D(augment(x)) w.r.t. x|^2 per image (B,), with the graph kept so it can be minimised. The
    logits join it times zero (as StyleGAN2-ADA's ``real_logits * 0``): the output bias, which the gradient
    does not depend on, still takes part in the backward, as DDP requires of every parameter."""
    real = real.detach().requires_grad_(True)
    logits, _ = discriminator(augment(real))
    (grad,) = torch.autograd.grad(logits.sum(), real, create_graph=True)
    return grad.square().sum([1, 2, 3]) + logits * 0


def info_nce(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of each query picking its key among [key, queue] (all L2-normalised)."""
    positive = (query * key).sum(1, keepdim=True)
    negative = query @ queue.t()
    logits = torch.cat([positive, negative], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(query), dtype=torch.long, device=query.device))


class InsGenState(nn.Module):
    """D_ema (the key encoder), the heads' momentum copies and the two queues. Not trained by an optimizer:
    the session carries it (the same on every rank: keys are gathered from all ranks before enqueueing)."""

    def __init__(self, discriminator: Discriminator, real_head: Head, fake_head: Head, *, real_queue: int, fake_queue: int, dim: int):
        super().__init__()
        self.d_ema = copy.deepcopy(discriminator).requires_grad_(False)
        self.real_head_ema = copy.deepcopy(real_head).requires_grad_(False)
        self.fake_head_ema = copy.deepcopy(fake_head).requires_grad_(False)
        self.register_buffer("queue_real", F.normalize(torch.randn(real_queue, dim), dim=1))  # InsGen: random, normalised
        self.register_buffer("queue_fake", F.normalize(torch.randn(fake_queue, dim), dim=1))
        self.register_buffer("ptr", torch.zeros(2, dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self, discriminator: nn.Module, real_head: nn.Module, fake_head: nn.Module, momentum: float) -> None:
        for ema, live in ((self.d_ema, discriminator), (self.real_head_ema, real_head), (self.fake_head_ema, fake_head)):
            for e, p in zip(ema.parameters(), live.parameters()):
                e.lerp_(p.detach(), 1 - momentum)
            for e, b in zip(ema.buffers(), live.buffers()):
                e.copy_(b)

    @torch.no_grad()
    def real_keys(self, images_aug: torch.Tensor) -> torch.Tensor:
        return self.real_head_ema(self.d_ema(images_aug)[1])

    @torch.no_grad()
    def fake_keys(self, images_aug: torch.Tensor) -> torch.Tensor:
        return self.fake_head_ema(self.d_ema(images_aug)[1])

    @torch.no_grad()
    def enqueue(self, which: str, keys: torch.Tensor) -> None:
        """This step's keys of every rank into queue ``which`` ('real' or 'fake'), oldest out."""
        keys = dist.all_gather(keys.detach())
        queue = self.queue_real if which == "real" else self.queue_fake
        slot = 0 if which == "real" else 1
        size = len(queue)
        keys = keys[-size:]
        idx = (self.ptr[slot] + torch.arange(len(keys), device=queue.device)) % size
        queue[idx] = keys.to(queue.dtype)
        self.ptr[slot] = (self.ptr[slot] + len(keys)) % size
