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
    """Frozen features of the clean held-out split (no DropToken: eval mode). A clip's first candidate text is its query."""
    total = sum(shard.num_samples for shard in load_shards(cfg.eval.urls))
    batch_size = min(cfg.eval.batch_size, total)  # the last partial batch (< batch_size clips) is left out
    data_cfg = cfg.data.model_copy(update={"urls": cfg.eval.urls, "index": None, "batch_size": batch_size, "shuffle_buffer": 0, "num_workers": 0})
    stream = DataStream(data_cfg, decoder=TripletDecoder(cfg.model), transform=to_tensors, rank=0, world_size=1)
    model.eval()
    parts: dict[str, list] = {"video": [], "video_vat": [], "text_vat": [], "video_va": [], "audio_va": [], "label": [], "style": []}
    for batch in stream:
        emb = model(batch["video"].to(device), batch["audio"].to(device), batch["text"].to(device))
        for key, value in (("video", emb.video_BD), ("video_vat", emb.video_vat), ("text_vat", emb.text_vat[:, 0]), ("video_va", emb.video_va), ("audio_va", emb.audio_va)):
            parts[key].append(value.cpu())
        parts["label"].append(batch["label"])
        parts["style"].append(batch["style"])
    model.train()
    return {k: torch.cat(v) for k, v in parts.items()}


def average_precision(sims_NM: torch.Tensor, relevant_NM: torch.Tensor) -> torch.Tensor:
    """Each query's average precision of its relevant items when the gallery is ranked by similarity, (N,)."""
    order = sims_NM.argsort(dim=1, descending=True)
    hits = relevant_NM.gather(1, order).float()
    precision = hits.cumsum(1) / torch.arange(1, hits.shape[1] + 1)
    return (precision * hits).sum(1) / hits.sum(1).clamp_min(1)


def group_retrieval(query_ND: torch.Tensor, gallery_ND: torch.Tensor, labels_N: torch.Tensor, groups_N: torch.Tensor, prefix: str) -> dict[str, float]:
    """Retrieval where a hit is a clip of the query's (class, style) group: a text says only class and style, so
    the clips of its group are all right answers (a perfect model scores 1.0 on both). ``group_r1``: the top clip
    is of the group; ``group_map``: mean average precision of the whole group; ``class_r1``: the top clip has the
    query's class. The chance levels come from random rankings (a fixed seed)."""
    sims = F.normalize(query_ND, dim=1) @ F.normalize(gallery_ND, dim=1).T
    relevant = groups_N.unsqueeze(1) == groups_N.unsqueeze(0)
    top = sims.argmax(1)
    g = torch.Generator().manual_seed(0)
    chance_map = torch.stack([average_precision(torch.rand(sims.shape, generator=g), relevant).mean() for _ in range(5)]).mean()
    return {
        f"{prefix}_group_r1": float((groups_N[top] == groups_N).float().mean()),
        f"{prefix}_group_map": float(average_precision(sims, relevant).mean()),
        f"{prefix}_class_r1": float((labels_N[top] == labels_N).float().mean()),
        f"{prefix}_group_r1_chance": float(relevant.float().mean(1).mean()),
        f"{prefix}_group_map_chance": float(chance_map),
    }


def linear_probe(features: torch.Tensor, labels: torch.Tensor, steps: int, seed: int = 0) -> float:
    """Accuracy of a linear classifier of ``labels`` on frozen features, trained on half, tested on half."""
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


# A triplet's entry in ``scores``: [sum of cosines, measurements, misaligned, last epoch measured, its cosine,
# sum of losses, its loss]. Its size is the number of triplets, whatever the number of epochs.
SUM_COS, COUNT, FLAG, LAST_EPOCH, LAST_COS, SUM_LOSS, LAST_LOSS = range(7)


def add_scores(scores: dict[str, list], epoch: int, keys, flags, losses, cosines) -> None:
    """Fold one step's measurements (each triplet's conflict cosine and its summed loss) into ``scores``."""
    for key, flag, loss, cos in zip(keys, flags, losses, cosines):
        entry = scores.setdefault(key, [0.0, 0, int(flag), -1, 0.0, 0.0, 0.0])
        entry[SUM_COS] += cos
        entry[COUNT] += 1
        entry[SUM_LOSS] += loss
        entry[LAST_EPOCH], entry[LAST_COS], entry[LAST_LOSS] = epoch, cos, loss


def merge_scores(parts: list[dict[str, list]]) -> dict[str, list]:
    """The ranks' ``scores`` as one (a triplet may be measured on different ranks in different epochs)."""
    merged: dict[str, list] = {}
    for part in parts:
        for key, entry in part.items():
            into = merged.setdefault(key, [0.0, 0, entry[FLAG], -1, 0.0, 0.0, 0.0])
            for i in (SUM_COS, COUNT, SUM_LOSS):
                into[i] += entry[i]
            if entry[LAST_EPOCH] > into[LAST_EPOCH]:
                into[LAST_EPOCH], into[LAST_COS], into[LAST_LOSS] = entry[LAST_EPOCH], entry[LAST_COS], entry[LAST_LOSS]
    return merged


def conflict_auroc(scores: dict[str, list], *, last_epoch: int) -> dict[str, float]:
    """How well the conflict score (-cosine) and, beside it, the loss flag misaligned triplets.

    ``conflict_auroc`` scores each triplet by the mean of its cosines over every epoch it was measured in:
    one measurement is noisy (DropToken, the batch's negatives), and a triplet is seen once an epoch.
    ``conflict_auroc_last_epoch`` uses the last epoch's single measurement of each triplet; ``loss_auroc`` the
    mean of its summed per-pair loss (l_va + l_vt), the score the loss-based curriculum ranks by.
    """
    if not scores:
        return {"conflict_auroc": float("nan"), "conflict_auroc_last_epoch": float("nan"), "loss_auroc": float("nan"), "conflict_auroc_samples": 0.0}
    entries = list(scores.values())
    flags = np.array([e[FLAG] for e in entries], dtype=int)
    mean_cos = np.array([e[SUM_COS] / e[COUNT] for e in entries])
    mean_loss = np.array([e[SUM_LOSS] / e[COUNT] for e in entries])
    last = [(e[LAST_COS], e[FLAG]) for e in entries if e[LAST_EPOCH] == last_epoch]
    return {
        "conflict_auroc": auroc(-mean_cos, flags),
        "conflict_auroc_last_epoch": auroc(-np.array([c for c, _ in last]), np.array([f for _, f in last], dtype=int)),
        "loss_auroc": auroc(mean_loss, flags),
        "conflict_auroc_samples": float(len(mean_cos)),
    }


def epoch_auroc(scores: dict[str, list], epoch: int) -> dict[str, float]:
    """At the end of ``epoch``: the AUROC of that epoch's single measurements (cosine and loss) and of the
    running means so far, over the triplets measured in it."""
    entries = [e for e in scores.values() if e[LAST_EPOCH] == epoch]
    flags = np.array([e[FLAG] for e in entries], dtype=int)
    return {
        "conflict_auroc": auroc(-np.array([e[LAST_COS] for e in entries]), flags),
        "conflict_auroc_mean": auroc(-np.array([e[SUM_COS] / e[COUNT] for e in entries]), flags),
        "loss_auroc": auroc(np.array([e[LAST_LOSS] for e in entries]), flags),
    }


def drop_counts(w_va: torch.Tensor, w_vt: torch.Tensor, audio_swapped: torch.Tensor, text_swapped: torch.Tensor) -> torch.Tensor:
    """[pairs dropped, swapped pairs among them, pairs seen, swapped pairs seen] of one step, on the device."""
    dropped = torch.cat([1 - w_va, 1 - w_vt])
    swapped = torch.cat([audio_swapped, text_swapped]).to(dropped.dtype)
    return torch.stack([dropped.sum(), (dropped * swapped).sum(), torch.tensor(float(len(dropped)), device=dropped.device), swapped.sum()])


def drop_precision(parts: list[list[float]]) -> dict[str, float]:
    """The curriculum's dropped pairs against the planted swaps, summed over ranks, over the steps where it could drop:
    ``drop_precision`` (swapped share of the dropped pairs), ``drop_base_rate`` (swapped share of all pairs seen)."""
    dropped, hits, seen, swapped = (sum(p[i] for p in parts) for i in range(4))
    nan = float("nan")
    return {"drop_precision": hits / dropped if dropped else nan, "drop_base_rate": swapped / seen if seen else nan, "dropped_share": dropped / seen if seen else nan}


def evaluate(model, cfg: VattConfig, device) -> dict:
    feats = embed(model, cfg, device)
    groups = feats["label"] * cfg.synthetic.num_styles + feats["style"]
    report = group_retrieval(feats["text_vat"], feats["video_vat"], feats["label"], groups, "t2v")
    report.update(group_retrieval(feats["audio_va"], feats["video_va"], feats["label"], groups, "a2v"))
    report["class_probe_accuracy"] = linear_probe(feats["video"], feats["label"], cfg.eval.probe_steps)
    report["style_probe_accuracy"] = linear_probe(feats["video"], feats["style"], cfg.eval.probe_steps)
    report["eval_samples"] = float(len(feats["label"]))
    return report


def summary(report: dict) -> str:
    """What a reader needs: group R@1 beside its chance level and ceiling, and the detectors' AUROC."""
    parts = []
    for prefix, what in (("t2v", "text-to-video"), ("a2v", "audio-to-video")):
        if f"{prefix}_group_r1" in report:
            parts.append(f"{what} group R@1 {report[f'{prefix}_group_r1']:.3f} (chance {report[f'{prefix}_group_r1_chance']:.3f}, ceiling 1.000), "
                         f"mAP {report[f'{prefix}_group_map']:.3f} (chance {report[f'{prefix}_group_map_chance']:.3f})")
    keys = ("t2v_class_r1", "class_probe_accuracy", "style_probe_accuracy", "conflict_auroc", "loss_auroc", "drop_precision", "drop_base_rate")
    parts += [f"{k} {report[k]:.3f}" for k in keys if isinstance(report.get(k), float) and not math.isnan(report[k])]
    return "; ".join(parts)


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
    """``<out_dir>/<run name>-eval.json`` and ``-curves.png`` (loss, conflict rate and kept share over steps, the
    conflict AUROC per epoch)."""
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
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for key, label in (("loss", "objective"), ("loss_va", "video-audio NCE"), ("loss_vt", "video-text MIL-NCE")):
        axes[0].plot(steps, [h[key] for h in history], label=label)
    axes[0].set(title="loss", xlabel="step")
    axes[0].legend()
    axes[1].plot(steps, [h.get("conflict_rate", float("nan")) for h in history], color="tab:red")
    axes[1].set(title="conflict rate (share with cos < 0)", xlabel="step", ylim=(0, 1))
    axes[2].plot(steps, [h["kept"] for h in history], color="tab:green")
    axes[2].set(title="share of pairs the curriculum kept", xlabel="step", ylim=(0, 1.05))
    epochs = report.get("epochs", [])
    for key, label in (("conflict_auroc", "conflict score, that epoch"), ("conflict_auroc_mean", "conflict score, mean so far"), ("loss_auroc", "loss, that epoch")):
        axes[3].plot([e["step"] for e in epochs], [e[key] for e in epochs], marker="o", label=label)
    axes[3].axhline(0.5, color="k", lw=0.8, ls="--")
    axes[3].set(title="AUROC for misaligned triplets (rank 0's)", xlabel="step", ylim=(0.3, 1.0))
    axes[3].legend(fontsize=7)
    fig.suptitle(f"{cfg.run.name}: {summary(report)}", fontsize=9)
    fig.tight_layout()
    png_path = os.path.join(out, f"{cfg.run.name}-curves.png")
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return [json_path, png_path]
