"""VTHCL's hierarchical slow/fast InfoNCE and RSPNet's appearance InfoNCE plus relative-speed ranking.

Negatives: the keys of every rank's batch (gathered; a query's own key is its positive) and the queue.
The function returns the loss, the keys to enqueue (already gathered), and the signals a person watches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from jobs.video_ssl.config import ObjectiveConfig
from labtrain import dist


@dataclass
class Output:
    loss: torch.Tensor
    enqueue: dict[str, torch.Tensor]
    signals: dict[str, torch.Tensor] = field(default_factory=dict)


def info_nce(q_BD: torch.Tensor, keys_ND: torch.Tensor, queue_KD: torch.Tensor, *, positive_at: torch.Tensor, temperature: float):
    """InfoNCE of each query against all gathered keys (its positive at ``positive_at``) and the queue.
    Returns (loss, mean positive cosine, mean negative cosine)."""
    logits = q_BD @ torch.cat([keys_ND, queue_KD]).T  # (B, N + K) cosines
    loss = F.cross_entropy(logits / temperature, positive_at)
    with torch.no_grad():
        pos = logits.gather(1, positive_at[:, None]).squeeze(1)
        neg_mask = torch.ones_like(logits, dtype=torch.bool).scatter_(1, positive_at[:, None], False)
        neg = logits[neg_mask].mean()
    return loss, pos.mean(), neg


def vthcl(query, key, clips, o: ObjectiveConfig) -> Output:
    """Query = the slow clip, key = the fast clip of the same video; one InfoNCE per stage head, summed
    with equal weights (``infonce`` is this with the last stage only)."""
    slow, fast = clips[:, 0], clips[:, 1]
    q = query(slow)
    k = key(fast)
    B = slow.shape[0]
    positive_at = dist.rank() * B + torch.arange(B, device=slow.device)
    total, signals, gathered = 0.0, {}, {}
    for name in q:
        keys = dist.all_gather(k[name])
        gathered[name] = keys
        loss, pos, neg = info_nce(q[name], keys, key.negatives(name), positive_at=positive_at, temperature=o.temperature)
        total = total + loss
        signals[f"loss_{name}"] = loss.detach()
        signals[f"pos_sim_{name}"], signals[f"neg_sim_{name}"] = pos, neg
    return Output(total, gathered, signals)


def rspnet(query, key, clips, o: ObjectiveConfig) -> Output:
    """Clips [anchor, same speed, other speed] of each video. Appearance: InfoNCE with the same-speed key
    (CE1) and with the other-speed key (CE2) as positives; speed: margin ranking so that the anchor's speed
    embedding is closer to the same-speed key's than to the other-speed key's."""
    anchor, same, other = clips[:, 0], clips[:, 1], clips[:, 2]
    B = anchor.shape[0]
    q = query(anchor)
    name = next(n for n in q if n.startswith("stage"))
    k_same, k_other = key(same), key(other)
    keys_same = dist.all_gather(k_same[name])
    keys_other = dist.all_gather(k_other[name])
    positive_at = dist.rank() * B + torch.arange(B, device=anchor.device)
    queue = key.negatives(name)
    ce1, pos1, neg1 = info_nce(q[name], keys_same, queue, positive_at=positive_at, temperature=o.temperature)
    ce2, pos2, _ = info_nce(q[name], keys_other, queue, positive_at=positive_at, temperature=o.temperature)
    sim_same = (q["speed"] * k_same["speed"]).sum(1)
    sim_other = (q["speed"] * k_other["speed"]).sum(1)
    rank = F.margin_ranking_loss(sim_same, sim_other, torch.ones_like(sim_same), margin=o.margin)
    loss = ce1 + ce2 + o.rank_weight * rank
    signals = {
        f"loss_{name}": (ce1 + ce2).detach(), "loss_rank": rank.detach(),
        f"pos_sim_{name}": (pos1 + pos2) / 2, f"neg_sim_{name}": neg1,
        "speed_acc": (sim_same > sim_other).float().mean(),
    }
    return Output(loss, {name: keys_same}, signals)


def supervised(query, clips, labels: torch.Tensor) -> Output:
    """The oracle arm: cross-entropy of the slow clip's class (the labels the other objectives never see)."""
    logits = query(clips[:, 0])["logits"]
    loss = F.cross_entropy(logits, labels)
    return Output(loss, {}, {"train_acc": (logits.argmax(1) == labels).float().mean()})


def objective(query, key, clips, o: ObjectiveConfig, labels: torch.Tensor | None = None) -> Output:
    if o.name == "supervised":
        if labels is None or bool((labels < 0).any()):
            raise ValueError("objective.name=supervised needs a label (.json 'label' or .cls) on every training video")
        return supervised(query, clips, labels)
    return rspnet(query, key, clips, o) if o.name == "rspnet" else vthcl(query, key, clips, o)
