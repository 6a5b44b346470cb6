"""pix2pixHD (arXiv 1711.11585, NVIDIA/pix2pixHD; METHODS.md 4.4): label map -> image.

G is the global generator (7x7 reflection-padded stem, ``n_downsample`` stride-2 convolutions, ``n_blocks``
ResNet blocks, as many transposed convolutions back, a 7x7 tanh head; InstanceNorm without affine). D is
``num_d`` PatchGAN discriminators, the i-th on the (label, image) pair average-pooled i times; each returns
its intermediate features, whose last entry is the patch prediction. Losses are LSGAN (D: half of real plus
fake), feature matching (L1 between D's features of the real and the generated pair at every scale and every
layer but the last, each term weighted lambda_feat x 4/(n_layers_d + 1) / num_d), no VGG loss (no pretrained
VGG can be had here). Adam 2e-4 (0.5, 0.999), constant lr, then a linear decay to zero.

One minibatch (:class:`Phases`): G's phase scores the generated and the real pair with D frozen (plain module,
no all-reduce) and steps G on LSGAN + FM; D's phase scores the same pairs with D unchanged and steps D, so
both losses see one D, as in pix2pixHD's code.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from jobs.gan.config import GANConfig, Pix2PixHDConfig
from jobs.gan.data import LABEL_COLOURS, PairDecoder
from labtrain import dist
from labtrain.data import DataStream, load_shards
from labtrain.train import Session


class ResnetBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class GlobalGenerator(nn.Module):
    def __init__(self, cfg: Pix2PixHDConfig, out_channels: int = 3):
        super().__init__()
        ngf, n = cfg.ngf, cfg.n_downsample
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(cfg.label_classes, ngf, 7), nn.InstanceNorm2d(ngf), nn.ReLU(True)]
        for i in range(n):
            c = ngf * 2**i
            layers += [nn.Conv2d(c, c * 2, 3, stride=2, padding=1), nn.InstanceNorm2d(c * 2), nn.ReLU(True)]
        layers += [ResnetBlock(ngf * 2**n) for _ in range(cfg.n_blocks)]
        for i in range(n):
            c = ngf * 2 ** (n - i)
            layers += [nn.ConvTranspose2d(c, c // 2, 3, stride=2, padding=1, output_padding=1), nn.InstanceNorm2d(c // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, label_map: torch.Tensor) -> torch.Tensor:
        return self.net(label_map)


class PatchDiscriminator(nn.Module):
    """pix2pixHD's NLayerDiscriminator with its intermediate features: ``n_layers`` 4x4 stride-2 convolutions
    (the first without norm), one stride-1 with norm, a stride-1 convolution to one channel; padding 2."""

    def __init__(self, in_channels: int, ndf: int, n_layers: int):
        super().__init__()
        blocks = [nn.Sequential(nn.Conv2d(in_channels, ndf, 4, stride=2, padding=2), nn.LeakyReLU(0.2, True))]
        c = ndf
        for _ in range(1, n_layers):
            blocks.append(nn.Sequential(nn.Conv2d(c, min(c * 2, 512), 4, stride=2, padding=2), nn.InstanceNorm2d(min(c * 2, 512)), nn.LeakyReLU(0.2, True)))
            c = min(c * 2, 512)
        blocks.append(nn.Sequential(nn.Conv2d(c, min(c * 2, 512), 4, stride=1, padding=2), nn.InstanceNorm2d(min(c * 2, 512)), nn.LeakyReLU(0.2, True)))
        blocks.append(nn.Sequential(nn.Conv2d(min(c * 2, 512), 1, 4, stride=1, padding=2)))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return features


class MultiscaleDiscriminator(nn.Module):
    def __init__(self, cfg: Pix2PixHDConfig, image_channels: int = 3):
        super().__init__()
        self.scales = nn.ModuleList(PatchDiscriminator(cfg.label_classes + image_channels, cfg.ndf, cfg.n_layers_d) for _ in range(cfg.num_d))

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        """Per scale (full size first), the features of every layer; the last is the patch prediction."""
        out = []
        for i, D in enumerate(self.scales):
            if i:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            out.append(D(x))
        return out


def lsgan(predictions: list[list[torch.Tensor]], target: float) -> torch.Tensor:
    """LSGAN: the mean squared distance of every scale's patch prediction to ``target``, summed over scales."""
    return sum(F.mse_loss(scale[-1], torch.full_like(scale[-1], target)) for scale in predictions)


def feature_matching(fake: list[list[torch.Tensor]], real: list[list[torch.Tensor]], cfg: Pix2PixHDConfig) -> torch.Tensor:
    """L1 between D's features of the generated and the real pair, every scale, every layer but the last,
    each term weighted lambda_feat x 4/(n_layers_d + 1) / num_d (pix2pixHD's weights)."""
    weight = cfg.lambda_feat * (4.0 / (cfg.n_layers_d + 1)) / cfg.num_d
    return sum(weight * F.l1_loss(f, r.detach()) for fs, rs in zip(fake, real) for f, r in zip(fs[:-1], rs[:-1]))


def pairs(label_map: torch.Tensor, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """D's input for one forward of both pairs: (label, fake) then (label, real), stacked on the batch."""
    return torch.cat([torch.cat([label_map, fake], 1), torch.cat([label_map, real], 1)])


def split(predictions: list[list[torch.Tensor]], B: int) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """Features of a forward of cat(first B, last B) -> (those of the first, those of the second)."""
    return [[f[:B] for f in scale] for scale in predictions], [[f[B:] for f in scale] for scale in predictions]


def linear_decay(total_steps: int, decay_from: float) -> Callable[[int], float]:
    """The lr factor per step: 1 for the first ``decay_from`` share of the steps, then linear to zero."""
    start = int(total_steps * decay_from)
    return lambda step: 1.0 if step < start else max(0.0, (total_steps - step) / max(total_steps - start, 1))


def build(cfg: GANConfig, total_steps: int) -> list[tuple]:
    p = cfg.pix2pixhd
    G, D = GlobalGenerator(p), MultiscaleDiscriminator(p)
    groups = []
    for model in (G, D):
        opt = torch.optim.Adam(model.parameters(), lr=p.lr, betas=(0.5, 0.999))
        groups.append((model, opt, torch.optim.lr_scheduler.LambdaLR(opt, linear_decay(total_steps, p.decay_from))))
    return groups


@dataclass
class Phases:
    """One minibatch: G's step, then D's, both against the same D."""

    cfg: GANConfig
    groups: list[tuple]  # (G, opt, sched), (D, opt, sched) as prepared
    backward: Callable[[torch.Tensor, nn.Module], None]
    unwrap: Callable[[nn.Module], nn.Module]

    def __post_init__(self):
        (self.G, self.opt_G, self.sched_G), (self.D, self.opt_D, self.sched_D) = self.groups
        self.D_plain = self.unwrap(self.D)

    def __call__(self, label_map: torch.Tensor, real: torch.Tensor) -> dict:
        p, B = self.cfg.pix2pixhd, len(real)
        fake = self.G(label_map)

        # -- G: LSGAN towards 1 on the generated pair, feature matching to the real pair's features (D frozen)
        self.D_plain.requires_grad_(False)
        fake_pred, real_pred = split(self.D_plain(pairs(label_map, fake, real)), B)
        loss_gan = lsgan(fake_pred, 1.0)
        loss_fm = feature_matching(fake_pred, real_pred, p) if p.feat_match else torch.zeros((), device=real.device)
        loss_G = loss_gan + loss_fm
        self.backward(loss_G, self.G)
        self.opt_G.step()
        self.opt_G.zero_grad()
        self.sched_G.step()
        self.D_plain.requires_grad_(True)

        # -- D: LSGAN, half of (fake towards 0 + real towards 1), on the same pairs (D not yet stepped)
        fake_pred, real_pred = split(self.D(pairs(label_map, fake.detach(), real)), B)
        loss_D_fake, loss_D_real = lsgan(fake_pred, 0.0), lsgan(real_pred, 1.0)
        loss_D = 0.5 * (loss_D_fake + loss_D_real)
        self.backward(loss_D, self.D)
        self.opt_D.step()
        self.opt_D.zero_grad()
        self.sched_D.step()
        return {"loss_generator": loss_G.detach(), "loss_generator_gan": loss_gan.detach(), "loss_feature_matching": loss_fm.detach(),
                "loss_discriminator": loss_D.detach(), "loss_discriminator_real": loss_D_real.detach(), "loss_discriminator_fake": loss_D_fake.detach()}


# -- evaluation -------------------------------------------------------------------------------------------------
def load_pairs(cfg: GANConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out pairs: one-hot label maps (N, C, R, R) and images (N, 3, R, R) in [-1, 1], in shard order."""
    total = sum(shard.num_samples for shard in load_shards(cfg.eval.urls, None, cfg.data.s3))
    batch_size = max(d for d in range(1, min(250, total) + 1) if total % d == 0)
    data_cfg = cfg.data.model_copy(update={"urls": cfg.eval.urls, "index": None, "batch_size": batch_size, "shuffle_buffer": 0, "num_workers": 0, "seed": 0})
    maps, images = [], []
    for batch in DataStream(data_cfg, decoder=PairDecoder(cfg.images, cfg.pix2pixhd.label_classes, train=False), rank=0, world_size=1):
        maps.append(batch["label_map"])
        images.append(batch["image"])
    return torch.cat(maps), torch.cat(images)


def l1_psnr(generated: torch.Tensor, truth: torch.Tensor) -> dict:
    """Mean absolute error and mean per-image PSNR (dB), both on [0, 1] pixels quantised to uint8 (what a PNG holds)."""
    g, t = _quantise(generated), _quantise(truth)
    mse = ((g - t) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return {"l1": float((g - t).abs().mean()), "psnr": float((10 * torch.log10(1 / mse)).mean())}


def _quantise(images: torch.Tensor) -> torch.Tensor:
    return ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255) / 255


class PairScorer:
    """L1/PSNR of G's images against the truth on the second half of the held-out pairs; the first half fits
    the class-mean baseline (every pixel the mean colour of its class: what a map says without texture)."""

    def __init__(self, maps: torch.Tensor, images: torch.Tensor):
        half = len(maps) // 2
        fit_maps, fit_images = maps[:half], images[:half]
        weights = fit_maps.sum((0, 2, 3)).clamp_min(1)
        self.class_means = torch.einsum("nchw,nkhw->kc", fit_images, fit_maps) / weights[:, None]  # (classes, 3)
        self.maps, self.images = maps[half:], images[half:]

    def baseline(self) -> dict:
        return l1_psnr(torch.einsum("nkhw,kc->nchw", self.maps, self.class_means), self.images)

    @torch.no_grad()
    def __call__(self, G: nn.Module, device: torch.device, batch_size: int = 100) -> dict:
        was = G.training
        G.eval()
        out = torch.cat([G(self.maps[i:i + batch_size].to(device)).cpu() for i in range(0, len(self.maps), batch_size)])
        G.train(was)
        return l1_psnr(out, self.images)

    @torch.no_grad()
    def grid(self, G: nn.Module, device: torch.device, count: int = 8) -> torch.Tensor:
        """(3, 3R, count R) in [0, 1]: the label maps in colour, G's images, the truth."""
        maps = self.maps[:count]
        was = G.training
        G.eval()
        fake = G(maps.to(device)).cpu()
        G.train(was)
        palette = torch.tensor([LABEL_COLOURS[k % len(LABEL_COLOURS)] for k in range(maps.shape[1])], dtype=torch.float32) / 255
        rows = [torch.einsum("nkhw,kc->nchw", maps, palette), (fake + 1) / 2, (self.images[:count] + 1) / 2]
        R = maps.shape[-1]
        return torch.stack(rows).clamp(0, 1).permute(2, 0, 3, 1, 4).reshape(3, 3 * R, count * R)


def summary(report: dict) -> str:
    return (f"pix2pixHD L1 {report['l1']:.4f} PSNR {report['psnr']:.2f} dB on {report['num_scored']} held-out pairs "
            f"(class-mean baseline L1 {report['baseline_l1']:.4f} PSNR {report['baseline_psnr']:.2f} dB)")


def write_report(report: dict, cfg: GANConfig) -> list[str]:
    """The report as JSON and a plot: held-out PSNR over training beside the class-mean baseline, the losses."""
    from jobs.gan.evaluate import plot_losses, write_files

    def draw(axes) -> None:
        evals = report["evaluations"]
        axes[0].plot([e["step"] for e in evals], [e["psnr"] for e in evals], "o-", label="G")
        axes[0].axhline(report["baseline_psnr"], color="k", ls="--", lw=1, label="class-mean baseline")
        axes[0].set(title="held-out PSNR (dB)", xlabel="step")
        axes[0].legend(fontsize=7)
        plot_losses(axes[1], report["history"])
        axes[1].set(yscale="log")

    return write_files(report, cfg, draw, 2, summary(report))


# -- the training function ------------------------------------------------------------------------------------------
def train(session: Session, cfg: GANConfig) -> None:
    from jobs.gan.evaluate import save_grid

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    p = cfg.pix2pixhd
    data = session.data(cfg.data, decoder=PairDecoder(cfg.images, p.label_classes))
    batch = cfg.data.batch_size * session.world_size
    total_steps = cfg.epochs * (data.samples_per_epoch // cfg.data.batch_size)
    groups = session.prepare(*build(cfg, total_steps))
    phases = Phases(cfg, groups, backward=lambda loss, model: session.backward(loss, model=model), unwrap=session.unwrap)
    scorer = PairScorer(*load_pairs(cfg)) if session.rank == 0 else None
    restored = session.restore(data)
    step = restored.step
    extra = restored.extra
    history: list[dict] = extra.get("history", [])
    evaluations: list[dict] = extra.get("evaluations", [])
    resumed_from: list[int] = extra.get("resumed_from", []) + ([step] if restored.resumed else [])
    train_s: float = extra.get("train_s", 0.0)
    session.total_steps = total_steps
    session.info("GAN (pix2pixHD, %d scale(s), feature matching %s, %dx%d): %d steps of %d pairs on %d workers, from step %d",
                 p.num_d, "on" if p.feat_match else "off", cfg.images.resolution, cfg.images.resolution, total_steps, batch, session.world_size, step)
    G_plain = session.unwrap(phases.G)

    def state() -> dict:
        return {"history": history, "evaluations": evaluations, "resumed_from": resumed_from, "train_s": train_s}

    latest: dict = {}
    while data.epoch < cfg.epochs:
        for batch_data in session.batches(data):
            started = time.perf_counter()
            signals = phases(batch_data["label_map"].to(session.device, non_blocking=True), batch_data["image"].to(session.device, non_blocking=True))
            step += 1
            history.append({"step": step, **signals})
            train_s += time.perf_counter() - started
            if step % cfg.eval.every == 0 or step == total_steps:
                if session.rank == 0:
                    scores = scorer(G_plain, session.device)
                    evaluations.append({"step": step, **scores})
                    latest = {"l1": scores["l1"], "psnr": scores["psnr"]}
                    grid = scorer.grid(G_plain, session.device)
                    session.log_image(step, "samples", grid)
                    save_grid(grid, os.path.join(cfg.out_dir, f"{cfg.run.name}-samples-{step:06d}.png"))
                dist.barrier()
            session.log(step, loss=signals["loss_generator"] + signals["loss_discriminator"], **signals, **latest)
            if step % cfg.checkpoint_every == 0:
                history = _plain(history)
                session.checkpoint(step, data, extra=state())

    history = _plain(history)
    metrics: dict = {}
    if session.rank == 0:
        last, baseline = evaluations[-1], scorer.baseline()
        report = {"model": "pix2pixhd", "l1": last["l1"], "psnr": last["psnr"], "baseline_l1": baseline["l1"], "baseline_psnr": baseline["psnr"],
                  "num_scored": len(scorer.maps), "num_d": p.num_d, "feat_match": p.feat_match, "evaluations": evaluations, "steps": step,
                  "history": history, "workers": session.world_size, "resumed_from": resumed_from, "global_batch": batch, "train_s": train_s,
                  "images_per_s": step * batch / max(train_s, 1e-9) if not resumed_from else None}
        paths = write_report(report, cfg)
        session.info("evaluation: %s", summary(report))
        session.info("wrote %s", ", ".join(paths))
        metrics = {k: v for k, v in report.items() if isinstance(v, (float, int, str))}
    dist.barrier()
    session.checkpoint(step, data, extra=state(), metrics=metrics)


def _plain(history: list[dict]) -> list[dict]:
    return [{k: float(v) if torch.is_tensor(v) else v for k, v in h.items()} for h in history]
