"""End-of-run evaluation: zero-shot text-to-video retrieval, a linear probe, conflict AUROC; JSON and a plot."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from jobs.vatt.config import VattConfig
from jobs.vatt.data import TripletDecoder, to_tensors
from labtrain.data import DataStream, load_shards


@torch.no_grad()
def embed(model, cfg: VattConfig, device) -> dict[str, torch.Tensor]:
    """Frozen features of the clean held-out split (no DropToken: eval mode)."""
    total = sum(shard.num_samples for shard in load_shards(cfg.eval.urls))
    batch_size = min(cfg.eval.batch_size, total)  # the last partial batch (< batch_size clips) is left out
    data_cfg = cfg.data.model_copy(update={"urls": cfg.eval.urls, "index": None, "batch_size": batch_size, "shuffle_buffer": 0, "num_workers": 0})
    stream = DataStream(data_cfg, decoder=TripletDecoder(cfg.model), transform=to_tensors, rank=0, world_size=1)
    model.eval()
    parts: dict[str, list] = {"video": [], "video_vat": [], "text_vat": [], "label": [], "style": []}
    for batch in stream:
        emb = model(batch["video"].to(device), batch["audio"].to(device), batch["text"].to(device))
        parts["video"].append(emb.video_BD.cpu())
        parts["video_vat"].append(emb.video_vat.cpu())
        parts["text_vat"].append(emb.text_vat.cpu())
        parts["label"].append(batch["label"])
        parts["style"].append(batch["style"])
    model.train()
    return {k: torch.cat(v) for k, v in parts.items()}


def retrieval(text_ND: torch.Tensor, video_ND: torch.Tensor, labels_N: torch.Tensor) -> dict[str, float]:
    """Text -> video recall at 1, 5, 10 by cosine in the common space (clip i is text i's match), and
    ``retrieval_class_r1``: the share of texts whose top clip has the text's latent class."""
    sims = F.normalize(text_ND, dim=1) @ F.normalize(video_ND, dim=1).T
    ranks = (sims > sims.diag().unsqueeze(1)).sum(1)  # videos scored above the right one
    report = {f"retrieval_r{k}": float((ranks < k).float().mean()) for k in (1, 5, 10)}
    report["retrieval_class_r1"] = float((labels_N[sims.argmax(1)] == labels_N).float().mean())
    return report


def linear_probe(features: torch.Tensor, labels: torch.Tensor, steps: int, seed: int = 0) -> float:
    """Accuracy of a linear classifier of the latent class on frozen features, trained on half, tested on half."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g)
    train, test = order[: len(order) // 2], order[len(order) // 2:]
    mean, std = features[train].mean(0), features[train].std(0).clamp_min(1e-6)
    x = (features - mean) / std
    probe = torch.nn.Linear(x.shape[1], int(labels.max()) + 1)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(probe(x[train]), labels[train]).backward()
            optimizer.step()
    with torch.no_grad():
        return float((probe(x[test]).argmax(1) == labels[test]).float().mean())


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for ``positives`` (Mann-Whitney U; ties count half)."""
    pos, neg = scores[positives == 1], scores[positives == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def add_scores(scores: dict[str, list], epoch: int, keys, cosines, flags) -> None:
    """Fold one step's measurements into ``scores``: key -> [sum of cosines, measurements, misaligned,
    last epoch measured, its cosine]. Its size is the number of triplets, whatever the number of epochs."""
    for key, cos, flag in zip(keys, cosines, flags):
        entry = scores.setdefault(key, [0.0, 0, int(flag), -1, 0.0])
        entry[0] += cos
        entry[1] += 1
        entry[3], entry[4] = epoch, cos


def merge_scores(parts: list[dict[str, list]]) -> dict[str, list]:
    """The ranks' ``scores`` as one (a triplet may be measured on different ranks in different epochs)."""
    merged: dict[str, list] = {}
    for part in parts:
        for key, (total, count, flag, epoch, cos) in part.items():
            entry = merged.setdefault(key, [0.0, 0, flag, -1, 0.0])
            entry[0] += total
            entry[1] += count
            if epoch > entry[3]:
                entry[3], entry[4] = epoch, cos
    return merged


def conflict_auroc(scores: dict[str, list], *, last_epoch: int) -> dict[str, float]:
    """How well the conflict score (-cosine) flags misaligned triplets, from :func:`add_scores`' aggregates.

    ``conflict_auroc`` scores each triplet by the mean of its cosines over every epoch it was measured in:
    one measurement is noisy (DropToken, the batch's negatives), and a triplet is seen once an epoch.
    ``conflict_auroc_last_epoch`` uses the last epoch's single measurement of each triplet.
    """
    if not scores:
        return {"conflict_auroc": float("nan"), "conflict_auroc_last_epoch": float("nan"), "conflict_auroc_samples": 0.0}
    entries = list(scores.values())
    mean_cos = np.array([total / count for total, count, *_ in entries])
    flags = np.array([flag for _, _, flag, *_ in entries], dtype=int)
    last = [(cos, flag) for _, _, flag, epoch, cos in entries if epoch == last_epoch]
    return {
        "conflict_auroc": auroc(-mean_cos, flags),
        "conflict_auroc_last_epoch": auroc(-np.array([c for c, _ in last]), np.array([f for _, f in last], dtype=int)),
        "conflict_auroc_samples": float(len(mean_cos)),
    }


def evaluate(model, cfg: VattConfig, device) -> dict:
    feats = embed(model, cfg, device)
    report = retrieval(feats["text_vat"], feats["video_vat"], feats["label"])
    report["linear_probe_accuracy"] = linear_probe(feats["video"], feats["label"], cfg.eval.probe_steps)
    report["eval_samples"] = float(len(feats["label"]))
    report["chance_r1"] = 1.0 / len(feats["label"])
    # Texts say only class and style: a perfect model ties with the clips of the same (class, style).
    group = feats["label"] * (int(feats["style"].max()) + 1) + feats["style"]
    report["ceiling_r1"] = float((1.0 / (group.unsqueeze(0) == group.unsqueeze(1)).sum(1).float()).mean())
    return report


def summary(report: dict) -> str:
    keys = ("retrieval_r1", "retrieval_r5", "retrieval_r10", "retrieval_class_r1", "linear_probe_accuracy", "conflict_auroc")
    return ", ".join(f"{k} {report[k]:.3f}" for k in keys if k in report and not math.isnan(report[k]))


def jsonable(obj):
    """NaN (an AUROC with no misaligned triplet to find, say) as null, so the files are strict JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def write_report(report: dict, cfg: VattConfig) -> list[str]:
    """``<out_dir>/<run name>-eval.json`` and ``-curves.png`` (loss, conflict rate, kept share over steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = cfg.out_dir  # made absolute by the driver (jobs.vatt.__main__.prepare)
    os.makedirs(out, exist_ok=True)
    json_path = os.path.join(out, f"{cfg.run.name}-eval.json")
    with open(json_path, "w") as f:
        json.dump(jsonable({"config": cfg.model_dump(mode="json"), **report}), f, indent=1, allow_nan=False)
    history = report["history"]
    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key, label in (("loss", "objective"), ("loss_va", "video-audio NCE"), ("loss_vt", "video-text MIL-NCE")):
        axes[0].plot(steps, [h[key] for h in history], label=label)
    axes[0].set(title="loss", xlabel="step")
    axes[0].legend()
    axes[1].plot(steps, [h["conflict_rate"] for h in history], color="tab:red")
    axes[1].set(title="conflict rate (share with cos < 0)", xlabel="step", ylim=(0, 1))
    axes[2].plot(steps, [h["kept"] for h in history], color="tab:green")
    axes[2].set(title="share kept by the curriculum", xlabel="step", ylim=(0, 1.05))
    fig.suptitle(f"{cfg.run.name}: {summary(report)}", fontsize=9)
    fig.tight_layout()
    png_path = os.path.join(out, f"{cfg.run.name}-curves.png")
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return [json_path, png_path]
