"""Scoring G_ema: FID_domain (or Inception FID from local weights), KID, mode coverage, sample grids, the report."""

from __future__ import annotations

import json
import math
import os

import torch

from jobs.gan import fid
from jobs.gan.config import GANConfig
from jobs.gan.data import ImageDecoder, to_uint8
from labtrain.data import DataStream, load_shards

EVAL_SEED = 20261202  # the latents and noise of every evaluation, in every run


def extractor_path(cfg: GANConfig) -> str:
    if cfg.eval.extractor_path:
        return cfg.eval.extractor_path
    first = cfg.eval.urls.split("::")[0]
    folder = cfg.out_dir if "://" in first else os.path.dirname(first)
    return os.path.join(folder, "fid_domain.pt")


def load_heldout(cfg: GANConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out real images as uint8 (N, 3, R, R) and labels (N,), in shard order."""
    total = sum(shard.num_samples for shard in load_shards(cfg.eval.urls, None, cfg.data.s3))
    batch_size = max(d for d in range(1, min(250, total) + 1) if total % d == 0)
    data_cfg = cfg.data.model_copy(update={"urls": cfg.eval.urls, "index": None, "batch_size": batch_size, "shuffle_buffer": 0, "num_workers": 0, "seed": 0})
    images, labels = [], []
    for batch in DataStream(data_cfg, decoder=ImageDecoder(cfg.images, train=False), rank=0, world_size=1):
        images.append(to_uint8(batch["image"]))
        labels.append(batch["label"])
    images, labels = torch.cat(images), torch.cat(labels)
    if (labels < 0).any():
        raise ValueError(f"eval.urls ({cfg.eval.urls}): {int((labels < 0).sum())} held-out images have no label (.cls); the domain extractor needs labels")
    return images, labels


def extractor(cfg: GANConfig, images: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> fid.Extractor:
    if images is None:
        images, labels = load_heldout(cfg)
    domain = fid.domain_extractor(images, labels, extractor_path(cfg), steps=cfg.eval.extractor_steps)
    return fid.inception_extractor(cfg.eval.inception_weights, domain) if cfg.eval.extractor == "inception" else domain


def scorer(cfg: GANConfig) -> fid.Scorer:
    """The scorer of this run's evaluations. The random state is left as it was (torchmetrics may draw from
    it while it sets up): a resumed run must go on with the very random numbers its checkpoint holds."""
    images, labels = load_heldout(cfg)
    e = cfg.eval
    with torch.random.fork_rng(devices=[]):
        ext = extractor(cfg, images, labels)
        # the noise floor: real images of the extractor's half at (up to) the generated N
        return fid.Scorer(ext, images[len(images) // 2:], floor=images[: min(len(images) // 2, e.num_generated)], kid_subsets=e.kid_subsets,
                          kid_subset_size=e.kid_subset_size, coverage_min_share=e.coverage_min_share, quality_threshold=e.quality_threshold)


@torch.no_grad()
def generate(G: torch.nn.Module, count: int, device, *, seed: int = EVAL_SEED, batch_size: int = 250) -> torch.Tensor:
    """``count`` uint8 images from fixed latents and noise; the training RNG is left as it was."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        was = G.training
        G.eval()
        out = [to_uint8(G(torch.randn(min(batch_size, count - i), G.z_dim, device=device))) for i in range(0, count, batch_size)]
        G.train(was)
    return torch.cat(out)


def score(cfg: GANConfig, scorer: fid.Scorer, G: torch.nn.Module, device) -> dict:
    return scorer(generate(G, cfg.eval.num_generated, device))


def sample_grid(cfg: GANConfig, G: torch.nn.Module, device, rows: int = 8) -> torch.Tensor:
    """(3, 8R, 8R) in [0, 1]: the same 64 latents at every evaluation."""
    images = generate(G, rows * rows, device, seed=EVAL_SEED + 1).float() / 255
    R = images.shape[-1]
    return images.reshape(rows, rows, 3, R, R).permute(2, 0, 3, 1, 4).reshape(3, rows * R, rows * R)


def save_grid(grid_CHW: torch.Tensor, path: str, scale: int = 4) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    array = (grid_CHW.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
    Image.fromarray(array).resize((array.shape[1] * scale, array.shape[0] * scale), Image.NEAREST).save(path)


def final(cfg: GANConfig, scorer: fid.Scorer, G: torch.nn.Module, evaluations: list[dict]) -> dict:
    last = evaluations[-1]
    ext = scorer.extractor
    floor = scorer(scorer.floor_images)
    return {
        "metric": ext.name, "extractor_path": ext.path, "extractor_sha256": ext.sha256, "extractor_accuracy": ext.classifier_accuracy,
        "num_generated": cfg.eval.num_generated, "num_reference": scorer.num_reference,
        "fid": last["fid"], "kid": last["kid"], "kid_std": last["kid_std"], "mode_coverage": last["mode_coverage"], "high_quality": last["high_quality"],
        "mode_histogram": last["mode_histogram"], "fid_floor": floor["fid"], "kid_floor": floor["kid"], "num_floor": len(scorer.floor_images),
        "insgen": cfg.insgen.enabled, "evaluations": evaluations,
    }


def summary(report: dict) -> str:
    return (f"{report['metric']} {report['fid']:.3f} (real-vs-real floor {report['fid_floor']:.3f}, N={report['num_generated']}) "
            f"KID {report['kid']:.4f} mode_coverage {report['mode_coverage']:.2f} high_quality {report['high_quality']:.2f}")


def write_files(report: dict, cfg: GANConfig, draw, panels: int, title: str) -> list[str]:
    """``<out_dir>/<run name>-eval.json`` (the config and ``report``) and ``-eval.png``, whose ``panels`` axes ``draw`` fills."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = cfg.out_dir
    os.makedirs(out, exist_ok=True)
    json_path = os.path.join(out, f"{cfg.run.name}-eval.json")
    with open(json_path, "w") as f:
        json.dump({"config": cfg.model_dump(mode="json"), **report}, f, indent=1, allow_nan=False)
    fig, axes = plt.subplots(1, panels, figsize=(4.4 * panels, 3.6))
    draw(axes)
    fig.suptitle(f"{cfg.run.name}: {title}", fontsize=9)
    fig.tight_layout()
    png_path = os.path.join(out, f"{cfg.run.name}-eval.png")
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return [json_path, png_path]


def plot_losses(ax, history: list[dict]) -> None:
    steps = [h["step"] for h in history]
    for name in sorted({k for h in history for k in h if k.startswith("loss")}):
        ax.plot(steps, [h.get(name, math.nan) for h in history], label=name, lw=0.8)
    ax.set(title="losses", xlabel="step")
    ax.legend(fontsize=7)


def write_report(report: dict, cfg: GANConfig) -> list[str]:
    """The report as JSON and a plot: FID/KID/coverage over training, losses, ADA p."""
    evals, history = report["evaluations"], report.get("history", [])

    def draw(axes) -> None:
        steps = [e["step"] for e in evals]
        axes[0].plot(steps, [e["fid"] for e in evals], "o-", label=report["metric"])
        axes[0].axhline(report["fid_floor"], color="k", ls="--", lw=1, label="real vs real (floor)")
        axes[0].set(title=f"{report['metric']} (N={report['num_generated']})", xlabel="step", yscale="log")
        axes[0].legend(fontsize=7)
        twin = axes[0].twinx()
        twin.plot(steps, [e["mode_coverage"] for e in evals], "s--", color="tab:green", label="mode coverage")
        twin.set(ylim=(0, 1.05), ylabel="mode coverage")
        plot_losses(axes[1], history)
        hsteps = [h["step"] for h in history]
        axes[2].plot(hsteps, [h.get("ada_p", math.nan) for h in history], label="ADA p")
        axes[2].plot(hsteps, [h.get("ada_rt", math.nan) for h in history], label="r_t", alpha=0.6)
        axes[2].axhline(cfg.ada.target, color="k", ls="--", lw=1, label="target")
        axes[2].set(title="ADA", xlabel="step")
        axes[2].legend(fontsize=7)

    return write_files(report, cfg, draw, 3, summary(report))
