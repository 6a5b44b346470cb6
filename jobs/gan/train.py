"""The GAN training function: runs on every Ray Train worker, top to bottom.

Each minibatch is StyleGAN2-ADA's phases in order: G main (G's optimizer), D main (D's and, with InsGen,
both heads' optimizers), and every ``loss.r1_every`` minibatches D's lazy R1 step. G and D are DDP-wrapped
for the phases that train them; a phase that only reads the other network uses its plain module with
gradients off, so no all-reduce is started for a network that is not being stepped.
"""

from __future__ import annotations

import os

import torch

from jobs.gan import evaluate
from jobs.gan.augment import AdaState, augment, ema_beta
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


def train(session: Session, cfg: GANConfig) -> None:
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    res, loss_cfg, ins = cfg.images.resolution, cfg.loss, cfg.insgen
    data = session.data(cfg.data, decoder=ImageDecoder(cfg.images))
    batch = cfg.data.batch_size * session.world_size
    total_steps = cfg.epochs * (data.samples_per_epoch // cfg.data.batch_size)
    G, D = Generator(cfg.model, res), Discriminator(cfg.model, res)
    G_ema = Generator(cfg.model, res).requires_grad_(False)
    G_ema.load_state_dict(G.state_dict())
    opt_G = adam(G.parameters(), loss_cfg.lr)
    opt_D = adam(D.parameters(), loss_cfg.lr, loss_cfg.r1_every if loss_cfg.r1_gamma > 0 else None)
    ada = AdaState(cfg.ada)
    groups = [(G, opt_G), (D, opt_D), (G_ema,), (ada,)]
    if ins.enabled:
        real_head, fake_head = Head(D.feature_dim, ins.dim), Head(D.feature_dim, ins.dim)
        real_size, fake_size = cfg.queue_sizes(data.samples_per_epoch * session.world_size, batch)
        state = InsGenState(D, real_head, fake_head, real_queue=real_size, fake_queue=fake_size, dim=ins.dim)
        # InsGen's heads have their own Adam: the real head with D's settings, the fake head with G's
        groups += [(real_head, adam(real_head.parameters(), loss_cfg.lr, loss_cfg.r1_every if loss_cfg.r1_gamma > 0 else None)),
                   (fake_head, adam(fake_head.parameters(), loss_cfg.lr)), (state,)]
    prepared = session.prepare(*groups)
    (G, opt_G), (D, opt_D), (G_ema,), (ada,) = prepared[:4]
    if ins.enabled:
        (real_head, opt_real), (fake_head, opt_fake), (state,) = prepared[4:]
    G_plain, D_plain = session.unwrap(G), session.unwrap(D)
    restored = session.restore(data)
    step = restored.step
    history: list[dict] = restored.extra.get("history", [])
    evaluations: list[dict] = restored.extra.get("evaluations", [])
    resumed_from: list[int] = restored.extra.get("resumed_from", []) + ([step] if restored.resumed else [])
    session.total_steps = total_steps
    scorer = evaluate.scorer(cfg) if session.rank == 0 else None
    session.info("GAN (stylegan2%s, %dx%d): %d steps of %d images on %d workers, from step %d; metric %s", " + InsGen" if ins.enabled else " + ADA",
                 res, res, total_steps, batch, session.world_size, step, scorer.extractor.name if scorer else "")
    device = session.device
    z_dim = cfg.model.z_dim
    latest_eval: dict = {}

    def aug(x: torch.Tensor) -> torch.Tensor:
        return augment(x, ada.p, cfg.ada)

    while data.epoch < cfg.epochs:
        for batch_data in session.batches(data):
            real = batch_data["image"].to(device, non_blocking=True)
            B = len(real)
            signals: dict = {}

            # -- G main: non-saturating loss through D (plain, frozen) [+ InsGen's diversity term]
            D_plain.requires_grad_(False)
            z = torch.randn(B, z_dim, device=device)
            fake = G(z, mixing=cfg.model.style_mixing)
            fake_logits, fake_feats = D_plain(aug(fake))
            loss_G = g_loss(fake_logits)
            if ins.enabled and ins.g_weight > 0:
                fake_head_plain = session.unwrap(fake_head).requires_grad_(False)
                with torch.no_grad():
                    key = state.fake_keys(aug(G_plain(z + ins.noise_std * torch.randn_like(z))))
                loss_div = info_nce(fake_head_plain(fake_feats), key, state.queue_fake, ins.temperature)
                loss_G = loss_G + ins.g_weight * loss_div
                fake_head_plain.requires_grad_(True)
                signals["loss_g_diversity"] = loss_div.detach()
            session.backward(loss_G, model=G)
            opt_G.step()
            opt_G.zero_grad()
            D_plain.requires_grad_(True)

            # -- D main: real vs fake in one forward [+ InsGen's real and fake instance discrimination]
            z = torch.randn(B, z_dim, device=device)
            with torch.no_grad():
                fake = G_plain(z, mixing=cfg.model.style_mixing)
            logits, feats = D(torch.cat([aug(real), aug(fake)]))
            real_logits, fake_logits = logits[:B], logits[B:]
            loss_D = d_loss(real_logits, fake_logits)
            if ins.enabled:
                with torch.no_grad():
                    real_key = state.real_keys(aug(real))  # an independent augmentation of the same images
                    fake_key = state.fake_keys(aug(G_plain(z + ins.noise_std * torch.randn_like(z), mixing=0.0)))
                    fake_enqueue = state.fake_head_ema(feats[B:].detach())
                loss_real_id = info_nce(real_head(feats[:B]), real_key, state.queue_real, ins.temperature)
                loss_fake_id = info_nce(fake_head(feats[B:]), fake_key, state.queue_fake, ins.temperature)
                loss_D = loss_D + ins.real_weight * loss_real_id + ins.fake_weight * loss_fake_id
                signals.update(loss_real_id=loss_real_id.detach(), loss_fake_id=loss_fake_id.detach())
            session.backward(loss_D, model=D)
            opt_D.step()
            opt_D.zero_grad()
            if ins.enabled:
                for opt in (opt_real, opt_fake):
                    opt.step()
                    opt.zero_grad()
                state.enqueue("real", real_key)
                state.enqueue("fake", fake_enqueue)
            ada.observe(real_logits)

            # -- D reg: lazy R1
            if loss_cfg.r1_gamma > 0 and (step + 1) % loss_cfg.r1_every == 0:
                penalty = r1_penalty(D, real, aug)
                session.backward((penalty * (loss_cfg.r1_gamma / 2)).mean() * loss_cfg.r1_every, model=D)
                opt_D.step()
                opt_D.zero_grad()
                signals["r1"] = penalty.detach().mean()

            step += 1
            with torch.no_grad():
                beta = ema_beta(loss_cfg.ema_kimg, loss_cfg.ema_rampup, batch, step * batch)
                for e, p in zip(G_ema.parameters(), G_plain.parameters()):
                    e.copy_(p.detach().lerp(e, beta))
                for e, b in zip(G_ema.buffers(), G_plain.buffers()):
                    e.copy_(b)
            if ins.enabled:
                state.momentum_update(D_plain, session.unwrap(real_head), session.unwrap(fake_head), ins.momentum)
            signals.update(loss_g=loss_G.detach(), loss_d=loss_D.detach(), real_score=real_logits.detach().mean(),
                           fake_score=fake_logits.detach().mean(), ada_rt=ada.r_t.clone())  # r_t of the window so far
            ada.maybe_adjust(step)
            signals["ada_p"] = ada.p.clone()
            history.append({"step": step, **signals})  # tensors: read at checkpoints and at the end, no sync per step
            if step % cfg.eval.every == 0 or step == total_steps:
                latest_eval = _evaluate(session, cfg, scorer, G_ema, step, evaluations)
            session.log(step, loss=loss_G.detach() + loss_D.detach(), **signals, **latest_eval)
            if step % cfg.checkpoint_every == 0:
                history = _plain(history)
                session.checkpoint(step, data, extra={"history": history, "evaluations": evaluations, "resumed_from": resumed_from})

    history = _plain(history)
    metrics: dict = {}
    if session.rank == 0:
        report = evaluate.final(cfg, scorer, G_ema, evaluations)
        report.update(steps=step, history=history, workers=session.world_size, resumed_from=resumed_from, global_batch=batch)
        paths = evaluate.write_report(report, cfg)
        session.info("evaluation: %s", evaluate.summary(report))
        session.info("wrote %s", ", ".join(paths))
        metrics = {k: v for k, v in report.items() if isinstance(v, (float, int, str))}
    dist.barrier()
    session.checkpoint(step, data, extra={"history": history, "evaluations": evaluations, "resumed_from": resumed_from}, metrics=metrics)


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
