"""GenDA: one-shot domain adaptation of a trained StyleGAN2 (arXiv 2111.09876, METHODS.md 4.3).

From a source run's checkpoint, the generator (its EMA copy, what the source run evaluated) and D are loaded
and frozen. Two small parts are trained adversarially against ONE target image:
- the attribute adaptor, a per-channel affine on w, w' = a * w + b (a = 1, b = 0 at the start), shared by
  every layer (so at the start the adapted G is the source G exactly);
- the attribute classifier, a linear head on D's frozen 4x4 features: the target image is its "real", adapted
  samples its "fake" (StyleGAN2's non-saturating loss).
The diversity constraint is truncation during training only: w = w_avg + psi (w - w_avg), psi = ``genda.truncation``,
with w_avg the mean of G.map(z) over 10k latents. The baseline (``genda.method=finetune``) fine-tunes all of G
and D on the same image with the same loss and steps, without truncation. D's inputs, real and fake, get ADA's
x-flip and integer translation with the fixed probability ``genda.augment_p`` (no colour operations: colour is
the attribute being transferred).

On each worker ``train(session, cfg)`` prepares the two trained parts (adaptor and classifier, or G and D) so a
resumed run continues; rank 0 writes ``<out_dir>/<run>-genda.json`` (losses), ``-generator.pt`` (the adapted
generator: G's weights, the adaptor's and w_avg) and ``-samples.png``.

    python -m jobs.gan --config jobs/gan/configs/genda-tiny.yaml genda.source=<checkpoint dir> genda.target=<image>
    python -m jobs.gan.genda_experiment --config jobs/gan/configs/genda-tiny.yaml --source <checkpoint dir> --out <folder>
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from jobs.gan import evaluate
from jobs.gan.augment import augment
from jobs.gan.config import AdaConfig, GANConfig, ModelConfig
from jobs.gan.losses import d_loss, g_loss
from jobs.gan.model import Discriminator, Generator
from labtrain import dist
from labtrain.config import ConfigError
from labtrain.train import Session

W_AVG_SEED = 20261203  # the latents of w_avg: the same mean on every rank and after a restart


class Adaptor(nn.Module):
    """w' = a * w + b per channel, one pair for every layer; identity at the start."""

    def __init__(self, w_dim: int):
        super().__init__()
        self.a = nn.Parameter(torch.ones(w_dim))
        self.b = nn.Parameter(torch.zeros(w_dim))

    def forward(self, w_BW: torch.Tensor) -> torch.Tensor:
        return w_BW * self.a + self.b


class AdaptedGenerator(nn.Module):
    """z -> G.synthesize(adaptor(w)), with w truncated towards w_avg when ``psi`` < 1. ``z_dim`` as G's, so
    evaluate.generate samples it like any generator."""

    def __init__(self, G: Generator, adaptor: Adaptor):
        super().__init__()
        self.G, self.adaptor, self.z_dim = G, adaptor, G.z_dim
        self.register_buffer("w_avg", torch.zeros(G.w_dim))

    def forward(self, z: torch.Tensor, *, psi: float = 1.0) -> torch.Tensor:
        w = self.G.map(z)
        if psi != 1.0:
            w = self.w_avg.lerp(w, psi)
        return self.G.synthesize(self.adaptor(w)[:, None].expand(-1, self.G.num_ws, -1))


@torch.no_grad()
def mean_w(G: Generator, count: int = 10_000) -> torch.Tensor:
    """w_avg: the mean of G.map(z) over ``count`` fixed latents (the caller's random state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(W_AVG_SEED)
        z = torch.randn(count, G.z_dim)
    return G.map(z.to(G.const.device)).mean(0)


# -- the source and the target -----------------------------------------------------------------------------

def load_source(model_cfg: ModelConfig, resolution: int, path: str) -> tuple[Generator, Discriminator]:
    """G_ema and D of a stylegan2 run's checkpoint folder. model.pt holds the trained models in the order
    jobs.gan.train.build prepares them (G, D [, InsGen's heads]); session.pt's 'carried' holds the untrained
    ones at their places in that order (G_ema third)."""
    models = torch.load(os.path.join(path, "model.pt"), map_location="cpu", weights_only=False)["models"]
    carried = torch.load(os.path.join(path, "session.pt"), map_location="cpu", weights_only=False)["carried"]
    G, D = Generator(model_cfg, resolution), Discriminator(model_cfg, resolution)
    try:
        G.load_state_dict(carried[2])
        D.load_state_dict(models[1])
    except (RuntimeError, IndexError, TypeError) as error:
        raise ConfigError(f"genda.source={path}: its G_ema/D do not fit this config's model and images sections (give the source run's "
                          f"model.* and images.resolution): {str(error).splitlines()[0]}") from error
    return G.requires_grad_(False).eval(), D.requires_grad_(False).eval()


def read_target(path: str, resolution: int) -> torch.Tensor:
    """The target image as (3, R, R) in [-1, 1], converted to RGB and resized (bicubic) as the decoder does.
    Raises ConfigError naming the path when it is missing or not an image."""
    if not os.path.isfile(path):
        raise ConfigError(f"genda.target={path}: no such file; give the path of the one target image (PNG or JPEG) every worker can read")
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ConfigError(f"genda.target={path}: not a readable image ({error}); give a PNG or JPEG file") from error
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1


def prepare_genda(cfg: GANConfig) -> GANConfig:
    """What mode=genda needs before anything starts: a readable target image and a source checkpoint folder
    with model.pt and session.pt (every refusal names the field and the path)."""
    g = cfg.genda
    read_target(g.target, cfg.images.resolution)
    if "://" in g.source:
        raise ConfigError(f"genda.source={g.source}: a local checkpoint folder is needed (copy the source run's checkpoint_* folder where the workers can read it)")
    missing = [name for name in ("model.pt", "session.pt") if not os.path.isfile(os.path.join(g.source, name))]
    if missing:
        raise ConfigError(f"genda.source={g.source}: {', '.join(missing)} missing; give a checkpoint_* folder of a stylegan2 run "
                          f"(<run.storage_path>/<run.name>/checkpoint_<date>)")
    load_source(cfg.model, cfg.images.resolution, g.source)  # refuses a model section that does not fit, here rather than on every worker
    return cfg


# -- one adaptation step -----------------------------------------------------------------------------------

def build(cfg: GANConfig, G_source: Generator, D_source: Discriminator) -> tuple[AdaptedGenerator, Discriminator, list[tuple]]:
    """The adapted generator, the D it trains against, and the two (model, optimizer) groups the session
    prepares: (adaptor, classifier) for GenDA, (G, D) for fine-tuning. Adam (0, 0.99) as the source run."""
    g = cfg.genda
    G, D = copy.deepcopy(G_source), copy.deepcopy(D_source)
    generator = AdaptedGenerator(G, Adaptor(G.w_dim))
    generator.w_avg.copy_(mean_w(G))

    def adam(params):
        return torch.optim.Adam(params, lr=g.lr, betas=(0.0, 0.99), eps=1e-8)

    if g.method == "adaptor":
        classifier = nn.Linear(D.feature_dim, 1)
        return generator, D, [(generator.adaptor, adam(generator.adaptor.parameters())), (classifier, adam(classifier.parameters()))]
    generator.adaptor.requires_grad_(False)
    G.requires_grad_(True).train()
    D.requires_grad_(True).train()
    return generator, D, [(G, adam(G.parameters())), (D, adam(D.parameters()))]


@dataclass
class Adaptation:
    """One step: the trained G-side part against the critic, then the critic on the target vs adapted samples.
    ``groups`` as prepared; ``backward(loss, model)`` and ``unwrap(model)`` are the session's."""

    cfg: GANConfig
    generator: AdaptedGenerator  # its adaptor / G are the prepared modules' plain ones
    D: Discriminator
    groups: list[tuple]
    backward: Callable[[torch.Tensor, nn.Module], None]
    unwrap: Callable[[nn.Module], nn.Module]
    device: torch.device

    def __post_init__(self):
        (self.trained_g, self.opt_g), (self.critic_model, self.opt_c) = self.groups
        self.adaptor_method = self.cfg.genda.method == "adaptor"
        self.aug_cfg = AdaConfig(enabled=self.cfg.genda.augment_p > 0, color=False)

    def aug(self, x: torch.Tensor) -> torch.Tensor:
        return augment(x, self.cfg.genda.augment_p, self.aug_cfg)

    def critic(self, x: torch.Tensor, model: nn.Module) -> torch.Tensor:
        """Logits: GenDA's classifier on frozen D's features, or the fine-tuned D's own."""
        if self.adaptor_method:
            return model(self.D(self.aug(x))[1]).squeeze(1)
        return model(self.aug(x))[0]

    def fake(self, z: torch.Tensor, trained: nn.Module) -> torch.Tensor:
        """Adapted samples through ``trained`` (the prepared adaptor or G, or its plain module): truncated only
        for GenDA, only in training."""
        if self.adaptor_method:
            with torch.no_grad():
                w = self.generator.w_avg.lerp(self.generator.G.map(z), self.cfg.genda.truncation)
            return self.generator.G.synthesize(trained(w)[:, None].expand(-1, self.generator.G.num_ws, -1))
        return trained(z)

    def __call__(self, target_B: torch.Tensor) -> dict:
        B, z_dim = len(target_B), self.generator.z_dim
        critic_plain = self.unwrap(self.critic_model)

        critic_plain.requires_grad_(False)  # G side: the critic is read, not trained (no all-reduce for it)
        loss_g = g_loss(self.critic(self.fake(torch.randn(B, z_dim, device=self.device), self.trained_g), critic_plain))
        self.backward(loss_g, self.trained_g)
        self.opt_g.step()
        self.opt_g.zero_grad()
        critic_plain.requires_grad_(True)

        with torch.no_grad():
            fake = self.fake(torch.randn(B, z_dim, device=self.device), self.unwrap(self.trained_g))
        logits = self.critic(torch.cat([target_B, fake]), self.critic_model)  # one forward, as the source run's D step
        loss_c = d_loss(logits[:B], logits[B:])
        self.backward(loss_c, self.critic_model)
        self.opt_c.step()
        self.opt_c.zero_grad()
        return {"loss_generator": loss_g.detach(), "loss_discriminator": loss_c.detach(), "real_score": logits[:B].detach().mean(),
                "fake_score": logits[B:].detach().mean()}


# -- the job ------------------------------------------------------------------------------------------------

def train(session: Session, cfg: GANConfig) -> None:
    """One worker's adaptation: ``genda.steps`` steps of ``genda.batch_size`` samples per worker against the target."""
    g = cfg.genda
    torch.manual_seed(cfg.seed)
    G_source, D_source = load_source(cfg.model, cfg.images.resolution, g.source)
    generator, D, groups = build(cfg, G_source, D_source)
    groups = session.prepare(*groups)
    generator.to(session.device)
    D.to(session.device)
    step_fn = Adaptation(cfg, generator, D, groups, backward=lambda loss, model: session.backward(loss, model=model), unwrap=session.unwrap, device=session.device)
    target_B = read_target(g.target, cfg.images.resolution).to(session.device)[None].expand(g.batch_size, -1, -1, -1)
    restored = session.restore()
    step, history = restored.step, restored.extra.get("history", [])
    resumed_from: list[int] = restored.extra.get("resumed_from", []) + ([step] if restored.resumed else [])
    session.total_steps = g.steps
    session.info("GenDA (%s%s) from %s to %s: %d steps of %d samples on %d workers, from step %d", g.method,
                 f", truncation {g.truncation}" if g.method == "adaptor" else "", g.source, g.target, g.steps, g.batch_size, session.world_size, step)
    started = time.perf_counter()
    for target in session.batches([target_B] * (g.steps - step)):
        signals = step_fn(target)
        step += 1
        history.append({"step": step, **signals})  # tensors: read at checkpoints and at the end, no sync per step
        session.log(step, loss=signals["loss_generator"] + signals["loss_discriminator"], **signals)
        if step % cfg.checkpoint_every == 0 and step < g.steps:
            history = _plain(history)
            session.checkpoint(step, extra={"history": history, "resumed_from": resumed_from})
    history = _plain(history)
    if session.rank == 0:
        paths = write_outputs(cfg, generator, history, resumed_from=resumed_from, train_s=time.perf_counter() - started, device=session.device)
        session.info("wrote %s", ", ".join(paths))
    dist.barrier()
    session.checkpoint(step, extra={"history": history, "resumed_from": resumed_from}, metrics={"loss_generator": history[-1]["loss_generator"]} if history else None)


def _plain(history: list[dict]) -> list[dict]:
    return [{k: float(v) if torch.is_tensor(v) else v for k, v in h.items()} for h in history]


def write_outputs(cfg: GANConfig, generator: AdaptedGenerator, history: list[dict], *, resumed_from: list[int], train_s: float, device) -> list[str]:
    """``<out_dir>/<run>-genda.json`` (config, losses), ``-generator.pt`` (what ``load_adapted`` reads) and ``-samples.png``
    (64 fixed latents, no truncation)."""
    stem = os.path.join(cfg.out_dir, f"{cfg.run.name}-genda")
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump({"config": cfg.model_dump(mode="json"), "history": history, "resumed_from": resumed_from, "train_s": train_s}, f, indent=1)
    torch.save({"G": generator.G.state_dict(), "adaptor": generator.adaptor.state_dict(), "w_avg": generator.w_avg.cpu()}, stem + "-generator.pt")
    evaluate.save_grid(evaluate.sample_grid(cfg, generator, device), stem + "-samples.png")
    return [stem + ".json", stem + "-generator.pt", stem + "-samples.png"]


def load_adapted(path: str, model_cfg: ModelConfig, resolution: int) -> AdaptedGenerator:
    state = torch.load(path, map_location="cpu", weights_only=True)
    generator = AdaptedGenerator(Generator(model_cfg, resolution), Adaptor(model_cfg.w_dim))
    generator.G.load_state_dict(state["G"])
    generator.adaptor.load_state_dict(state["adaptor"])
    generator.w_avg.copy_(state["w_avg"])
    return generator.requires_grad_(False).eval()
