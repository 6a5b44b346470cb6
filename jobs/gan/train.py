"""The GAN training function: runs on every Ray Train worker, top to bottom.

Each minibatch is StyleGAN2-ADA's phases in order (:class:`Phases`): G main (G's optimizer), D main (D's
and, with InsGen, both heads' optimizers), and every ``loss.r1_every`` minibatches D's lazy R1 step. G and
D are DDP-wrapped for the phases that train them; a phase that only reads the other network uses its plain
module with gradients off, so no all-reduce is started for a network that is not being stepped.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from jobs.gan import evaluate
from jobs.gan.augment import AdaState, augment
from jobs.gan.config import GANConfig
from jobs.gan.data import ImageDecoder
from jobs.gan.losses import InsGenState, d_loss, g_loss, info_nce, r1_penalty
from jobs.gan.model import Discriminator, Generator, Head
from labtrain import dist
from labtrain.train import Session


def adam(params, lr: float, reg_interval: int | None = None) -> torch.optim.Adam:
    """Adam (0, 0.99), eps 1e-8; for a lazily regularised network lr x c and betas ^ c with c = I/(I+1)."""
    c = reg_interval / (reg_interval + 1) if reg_interval else 1.0
    return torch.optim.Adam(params, lr=lr * c, betas=(0.0, 0.99**c), eps=1e-8)


def ema_beta(cfg_kimg: float | None, rampup: float | None, batch: int, images_seen: int) -> float:
    """G EMA decay per step (StyleGAN2-ADA): half-life ema_kimg (auto: batch * 10/32), ramped up to 5% of the images seen."""
    ema_nimg = (cfg_kimg if cfg_kimg is not None else batch * 10 / 32) * 1000
    if rampup is not None:
        ema_nimg = min(ema_nimg, images_seen * rampup)
    return 0.5 ** (batch / max(ema_nimg, 1e-8)) if ema_nimg > 0 else 0.0


def build(cfg: GANConfig, num_images: int, global_batch: int) -> list[tuple]:
    """The (model, optimizer) groups the session prepares: G, D, G_ema, ADA's state [, the heads, InsGen's state]."""
    res, loss_cfg, ins = cfg.images.resolution, cfg.loss, cfg.insgen
    G, D = Generator(cfg.model, res), Discriminator(cfg.model, res)
    G_ema = Generator(cfg.model, res).requires_grad_(False)
    G_ema.load_state_dict(G.state_dict())
    d_interval = loss_cfg.r1_every if loss_cfg.r1_gamma > 0 else None
    groups = [(G, adam(G.parameters(), loss_cfg.lr)), (D, adam(D.parameters(), loss_cfg.lr, d_interval)), (G_ema,), (AdaState(cfg.ada),)]
    if ins.enabled:
        real_head, fake_head = Head(D.feature_dim, ins.dim), Head(D.feature_dim, ins.dim)
        real_size, fake_size = cfg.queue_sizes(num_images, global_batch)
        state = InsGenState(D, real_head, fake_head, real_queue=real_size, fake_queue=fake_size, dim=ins.dim)
        # InsGen's heads have their own Adam: the real head with D's settings, the fake head with G's
        groups += [(real_head, adam(real_head.parameters(), loss_cfg.lr, d_interval)), (fake_head, adam(fake_head.parameters(), loss_cfg.lr)), (state,)]
    return groups


@dataclass
class Phases:
    """One minibatch of training. ``backward(loss, model)`` and ``unwrap(model)`` are the session's (or, in the
    benchmark, plain ``loss.backward()`` and the identity)."""

    cfg: GANConfig
    groups: list[tuple]  # as prepared: (G, opt_G), (D, opt_D), (G_ema,), (ada,) [, (real_head, opt), (fake_head, opt), (state,)]
    backward: Callable[[torch.Tensor, nn.Module], None]
    unwrap: Callable[[nn.Module], nn.Module]
    device: torch.device
    global_batch: int

    def __post_init__(self):
        (self.G, self.opt_G), (self.D, self.opt_D), (self.G_ema,), (self.ada,) = self.groups[:4]
        self.insgen = self.cfg.insgen.enabled
        if self.insgen:
            (self.real_head, self.opt_real), (self.fake_head, self.opt_fake), (self.state,) = self.groups[4:]
        self.G_plain, self.D_plain = self.unwrap(self.G), self.unwrap(self.D)

    def aug(self, x: torch.Tensor) -> torch.Tensor:
        return augment(x, self.ada.p, self.cfg.ada)

    def __call__(self, real: torch.Tensor, step: int) -> dict:
        """Train on ``real`` (B, 3, R, R); ``step`` is the number of minibatches before this one. Returns the
        step's signals as tensors (read only when logged)."""
        cfg, ins, loss_cfg = self.cfg, self.cfg.insgen, self.cfg.loss
        G, D, G_plain, D_plain, ada, aug = self.G, self.D, self.G_plain, self.D_plain, self.ada, self.aug
        B, z_dim, signals = len(real), cfg.model.z_dim, {}

        # -- G main: non-saturating loss through D (plain, frozen) [+ InsGen's diversity term]
        D_plain.requires_grad_(False)
        z = torch.randn(B, z_dim, device=self.device)
        fake_logits, fake_feats = D_plain(aug(G(z, mixing=cfg.model.style_mixing)))
        loss_G = g_loss(fake_logits)
        if self.insgen and ins.g_weight > 0:
            fake_head = self.unwrap(self.fake_head).requires_grad_(False)
            with torch.no_grad():
                key = self.state.fake_keys(aug(G_plain(z + ins.noise_std * torch.randn_like(z))))
            loss_div = info_nce(fake_head(fake_feats), key, self.state.queue_fake, ins.temperature)
            loss_G = loss_G + ins.g_weight * loss_div
            fake_head.requires_grad_(True)
            signals["loss_g_diversity"] = loss_div.detach()
        self.backward(loss_G, G)
        self.opt_G.step()
        self.opt_G.zero_grad()
        D_plain.requires_grad_(True)

        # -- D main: real vs fake in one forward [+ InsGen's real and fake instance discrimination]
        z = torch.randn(B, z_dim, device=self.device)
        with torch.no_grad():
            fake = G_plain(z, mixing=cfg.model.style_mixing)
        logits, feats = D(torch.cat([aug(real), aug(fake)]))
        real_logits, fake_logits = logits[:B], logits[B:]
        loss_D = d_loss(real_logits, fake_logits)
        if self.insgen:
            with torch.no_grad():
                real_key = self.state.real_keys(aug(real))  # an independent augmentation of the same images
                fake_key = self.state.fake_keys(aug(G_plain(z + ins.noise_std * torch.randn_like(z), mixing=0.0)))
                fake_enqueue = self.state.fake_head_ema(feats[B:].detach())
            loss_real_id = info_nce(self.real_head(feats[:B]), real_key, self.state.queue_real, ins.temperature)
            loss_fake_id = info_nce(self.fake_head(feats[B:]), fake_key, self.state.queue_fake, ins.temperature)
            loss_D = loss_D + ins.real_weight * loss_real_id + ins.fake_weight * loss_fake_id
            signals.update(loss_real_id=loss_real_id.detach(), loss_fake_id=loss_fake_id.detach())
        self.backward(loss_D, D)
        self.opt_D.step()
        self.opt_D.zero_grad()
        if self.insgen:
            for opt in (self.opt_real, self.opt_fake):
                opt.step()
                opt.zero_grad()
            self.state.enqueue("real", real_key)
            self.state.enqueue("fake", fake_enqueue)
        ada.observe(real_logits)

        # -- D reg: lazy R1
        if loss_cfg.r1_gamma > 0 and (step + 1) % loss_cfg.r1_every == 0:
            penalty = r1_penalty(D, real, aug)
            self.backward((penalty * (loss_cfg.r1_gamma / 2)).mean() * loss_cfg.r1_every, D)
            self.opt_D.step()
            self.opt_D.zero_grad()
            signals["r1"] = penalty.detach().mean()

        step += 1
        with torch.no_grad():
            beta = ema_beta(loss_cfg.ema_kimg, loss_cfg.ema_rampup, self.global_batch, step * self.global_batch)
            for e, p in zip(self.G_ema.parameters(), G_plain.parameters()):
                e.copy_(p.detach().lerp(e, beta))
            for e, b in zip(self.G_ema.buffers(), G_plain.buffers()):
                e.copy_(b)
        if self.insgen:
            self.state.momentum_update(D_plain, self.unwrap(self.real_head), self.unwrap(self.fake_head), ins.momentum)
        signals.update(loss_generator=loss_G.detach(), loss_discriminator=loss_D.detach(), real_score=real_logits.detach().mean(),
                       fake_score=fake_logits.detach().mean(), ada_rt=ada.r_t.clone())  # r_t of the window so far
        ada.maybe_adjust(step)
        signals["ada_p"] = ada.p.clone()
        return signals


def train(session: Session, cfg: GANConfig) -> None:
    """One worker's run: StyleGAN2 (+ ADA, InsGen) here; pix2pixHD and GenDA in their modules."""
    if cfg.model.arch == "pix2pixhd":
        from jobs.gan.pix2pixhd import train as train_pix2pixhd

        return train_pix2pixhd(session, cfg)
    if cfg.mode == "genda":
        from jobs.gan.genda import train as train_genda

        return train_genda(session, cfg)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    data = session.data(cfg.data, decoder=ImageDecoder(cfg.images))
    batch = cfg.data.batch_size * session.world_size
    total_steps = cfg.epochs * (data.samples_per_epoch // cfg.data.batch_size)
    groups = session.prepare(*build(cfg, data.samples_per_epoch * session.world_size, batch))
    phases = Phases(cfg, groups, backward=lambda loss, model: session.backward(loss, model=model), unwrap=session.unwrap, device=session.device, global_batch=batch)
    scorer = evaluate.scorer(cfg) if session.rank == 0 else None  # before the restore: it must not move the restored random state
    restored = session.restore(data)
    step = restored.step
    history: list[dict] = restored.extra.get("history", [])
    evaluations: list[dict] = restored.extra.get("evaluations", [])
    resumed_from: list[int] = restored.extra.get("resumed_from", []) + ([step] if restored.resumed else [])
    train_s: float = restored.extra.get("train_s", 0.0)
    session.total_steps = total_steps
    session.info("GAN (stylegan2 + %s, %dx%d): %d steps of %d images on %d workers, from step %d; metric %s", "InsGen" if cfg.insgen.enabled else "ADA",
                 cfg.images.resolution, cfg.images.resolution, total_steps, batch, session.world_size, step, scorer.extractor.name if scorer else "")
    latest_eval: dict = {}
    while data.epoch < cfg.epochs:
        for batch_data in session.batches(data):
            started = time.perf_counter()
            signals = phases(batch_data["image"].to(session.device, non_blocking=True), step)
            step += 1
            history.append({"step": step, **signals})  # tensors: read at checkpoints and at the end, no sync per step
            train_s += time.perf_counter() - started  # the steps' host time (the losses are read later)
            if step % cfg.eval.every == 0 or step == total_steps:
                latest_eval = _evaluate(session, cfg, scorer, phases.G_ema, step, evaluations)
            session.log(step, loss=signals["loss_generator"] + signals["loss_discriminator"], **signals, **latest_eval)
            if step % cfg.checkpoint_every == 0:
                history = _plain(history)
                session.checkpoint(step, data, extra={"history": history, "evaluations": evaluations, "resumed_from": resumed_from, "train_s": train_s})

    history = _plain(history)
    metrics: dict = {}
    if session.rank == 0:
        report = evaluate.final(cfg, scorer, phases.G_ema, evaluations)
        report.update(steps=step, history=history, workers=session.world_size, resumed_from=resumed_from, global_batch=batch,
                      train_s=train_s, images_per_s=step * batch / max(train_s, 1e-9) if not resumed_from else None)
        paths = evaluate.write_report(report, cfg)
        session.info("evaluation: %s", evaluate.summary(report))
        session.info("wrote %s", ", ".join(paths))
        metrics = {k: v for k, v in report.items() if isinstance(v, (float, int, str))}
    dist.barrier()
    session.checkpoint(step, data, extra={"history": history, "evaluations": evaluations, "resumed_from": resumed_from, "train_s": train_s}, metrics=metrics)


def _evaluate(session: Session, cfg: GANConfig, scorer, G_ema, step: int, evaluations: list[dict]) -> dict:
    """Rank 0 scores G_ema and saves a sample grid; every rank waits for it."""
    out: dict = {}
    if session.rank == 0:
        scores = evaluate.score(cfg, scorer, G_ema, session.device)
        evaluations.append({"step": step, **scores})
        grid = evaluate.sample_grid(cfg, G_ema, session.device)
        session.log_image(step, "samples", grid)
        evaluate.save_grid(grid, os.path.join(cfg.out_dir, f"{cfg.run.name}-samples-{step:06d}.png"))
        out = {"fid_domain" if cfg.eval.extractor == "domain" else "fid_inception": scores["fid"], "kid": scores["kid"], "mode_coverage": scores["mode_coverage"]}
    dist.barrier()
    return out


def _plain(history: list[dict]) -> list[dict]:
    return [{k: float(v) if torch.is_tensor(v) else v for k, v in h.items()} for h in history]
