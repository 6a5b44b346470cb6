"""GenDA on one process: the adaptor starts as the identity, G and D stay frozen, the target must be readable,
adaptation moves the samples' colour towards the target's, and the job runs end to end (Ray Train local mode)."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from jobs.gan import genda, genda_experiment
from jobs.gan.config import GANConfig
from labtrain.config import ConfigError, RunConfig
from labtrain.train.strategies import DDPStrategy

TINY = {"z_dim": 8, "w_dim": 8, "g_channels": 16, "d_channels": 16, "min_channels": 8}


def config(tmp_path, **genda_fields) -> GANConfig:
    return GANConfig(data={"urls": str(tmp_path / "train-{000000..000000}.tar"), "batch_size": 8}, eval={"urls": str(tmp_path / "eval-{000000..000000}.tar")},
                     images={"resolution": 16}, model=TINY, mode="genda", genda={"source": str(tmp_path / "source"), "target": str(tmp_path / "target.png"),
                                                                                  "batch_size": 8, "steps": 4, **genda_fields},
                     run={"name": "genda-test", "num_workers": 0, "storage_path": str(tmp_path / "ckpt"), "tensorboard": False, "log_every": 2},
                     out_dir=str(tmp_path / "out"), checkpoint_every=2)


def write_source(cfg: GANConfig) -> dict:
    """A stylegan2 run's checkpoint folder as the job writes it: model.pt through the DDP strategy (G, D), session.pt's
    carried models (G_ema third, ADA's state fourth). G_ema differs from G, so loading the wrong one shows."""
    from jobs.gan.train import build

    torch.manual_seed(0)
    groups = build(cfg.model_copy(update={"mode": "train"}), 32, 8)
    with torch.no_grad():
        for p in groups[2][0].parameters():
            p.add_(0.1 * torch.randn_like(p))
    strategy = DDPStrategy(RunConfig(num_workers=1))
    strategy.prepare([(tuple(g) + (None, None))[:3] for g in groups])
    os.makedirs(cfg.genda.source, exist_ok=True)
    strategy.save(cfg.genda.source)
    torch.save({"schedulers": [None] * len(groups), "carried": [None, None, groups[2][0].state_dict(), groups[3][0].state_dict()]},
               os.path.join(cfg.genda.source, "session.pt"))
    Image.fromarray(genda_experiment.render_target("disc", 16)).save(cfg.genda.target)
    return {"G_ema": groups[2][0], "D": groups[1][0]}


def adaptation(cfg: GANConfig) -> genda.Adaptation:
    G, D = genda.load_source(cfg.model, 16, cfg.genda.source)
    generator, D, groups = genda.build(cfg, G, D)
    return genda.Adaptation(cfg, generator, D, groups, backward=lambda loss, model: loss.backward(), unwrap=lambda m: m, device=torch.device("cpu"))


def target_batch(cfg: GANConfig) -> torch.Tensor:
    return genda.read_target(cfg.genda.target, 16)[None].expand(cfg.genda.batch_size, -1, -1, -1)


def test_the_source_is_g_ema_and_d_and_the_adaptor_starts_as_the_identity(tmp_path):
    cfg = config(tmp_path)
    source = write_source(cfg)
    G, D = genda.load_source(cfg.model, 16, cfg.genda.source)
    assert all(torch.equal(a, b) for a, b in zip(G.state_dict().values(), source["G_ema"].state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(D.state_dict().values(), source["D"].state_dict().values()))
    adapted = genda.AdaptedGenerator(G, genda.Adaptor(G.w_dim))
    z = torch.randn(6, G.z_dim)
    torch.manual_seed(1)
    want = G(z)
    torch.manual_seed(1)
    assert torch.equal(adapted(z), want), "a = 1, b = 0: the adapted G is the source G exactly"
    adapted.w_avg.copy_(genda.mean_w(G))
    torch.manual_seed(1)
    assert not torch.equal(adapted(z, psi=0.7), want), "truncation changes the samples (training only)"


def test_with_the_adaptor_g_and_d_stay_frozen_and_only_the_adaptor_and_classifier_learn(tmp_path):
    cfg = config(tmp_path)
    write_source(cfg)
    G0, D0 = genda.load_source(cfg.model, 16, cfg.genda.source)
    step = adaptation(cfg)
    classifier0 = [p.clone() for p in step.critic_model.parameters()]
    for _ in range(3):
        step(target_batch(cfg))
    assert all(torch.equal(a, b) for a, b in zip(step.generator.G.state_dict().values(), G0.state_dict().values())), "G is frozen"
    assert all(torch.equal(a, b) for a, b in zip(step.D.state_dict().values(), D0.state_dict().values())), "D is frozen"
    assert not torch.equal(step.generator.adaptor.a, torch.ones(8)) and not torch.equal(step.generator.adaptor.b, torch.zeros(8))
    assert any(not torch.equal(a, b) for a, b in zip(step.critic_model.parameters(), classifier0))


@pytest.mark.parametrize("content", [None, b"this is not an image"])
def test_an_unreadable_target_is_refused_before_anything_starts_naming_its_path(tmp_path, content):
    cfg = config(tmp_path)
    write_source(cfg)
    bad = tmp_path / "nope.png"
    if content is not None:
        bad.write_bytes(content)
    cfg = cfg.model_copy(update={"genda": cfg.genda.model_copy(update={"target": str(bad)})})
    with pytest.raises(ConfigError, match=f"genda.target={bad}: (no such file|not a readable image)"):
        genda.prepare_genda(cfg)
    with pytest.raises(ValueError, match="mode=genda needs genda.source and genda.target"):
        GANConfig(**{**cfg.model_dump(), "genda": {}})
    empty = cfg.model_copy(update={"genda": cfg.genda.model_copy(update={"source": str(tmp_path), "target": cfg.genda.target.replace("nope", "target")})})
    with pytest.raises(ConfigError, match=f"genda.source={tmp_path}: model.pt, session.pt missing"):
        genda.prepare_genda(empty)


def colour_distance(images: torch.Tensor, target: torch.Tensor) -> float:
    """Distance between the mean RGB of the images' pixels and the target's, in [-1, 1] units."""
    return float((images.mean((0, 2, 3)) - target.mean((1, 2))).norm())


@pytest.mark.parametrize("method", ["adaptor", "finetune"])
def test_adaptation_moves_the_samples_colour_towards_the_green_target(tmp_path, method):
    cfg = config(tmp_path, method=method, lr=0.01)
    write_source(cfg)
    step = adaptation(cfg)
    z = torch.randn(64, cfg.model.z_dim, generator=torch.Generator().manual_seed(0))
    target = genda.read_target(cfg.genda.target, 16)
    with torch.no_grad():
        before = colour_distance(step.generator(z), target)
    torch.manual_seed(0)
    for _ in range(60):
        step(target_batch(cfg))
    with torch.no_grad():
        after = colour_distance(step.generator(z), target)
    assert after < 0.5 * before, f"{method}: the samples' mean colour is {before:.3f} from the target's before, {after:.3f} after 60 steps"


def test_the_colour_oracle_reads_the_corpus_and_the_target_and_no_object_in_a_bright_background():
    from jobs.gan import data

    images, labels = data.shapes(200, 16, 10, seed=3)
    colour = genda_experiment.object_colour(torch.from_numpy(images).permute(0, 3, 1, 2))
    assert torch.equal(colour, torch.where(torch.from_numpy(labels) % 2 == 0, 0, 2)), "red and blue modes read red and blue"
    targets = torch.stack([torch.from_numpy(genda_experiment.render_target(shape, 16)).permute(2, 0, 1) for shape in data.SHAPES])
    assert genda_experiment.object_colour(targets).tolist() == [1] * 5
    teal = targets.clone()
    teal[:] = torch.tensor([60, 140, 120], dtype=torch.uint8)[:, None, None]  # a bright teal background, no object
    assert genda_experiment.object_colour(teal).tolist() == [3] * 5
    flooded = targets.clone()
    flooded[:, 1] = 200  # green everywhere: not an object on a dark background
    assert genda_experiment.object_colour(flooded).tolist() == [3] * 5


def test_the_job_runs_and_writes_the_adapted_generator(tmp_path):
    from labtrain.train import run

    cfg = config(tmp_path)
    write_source(cfg)
    result = run(genda.train, cfg, cfg.run, kind="gan")
    assert result.error is None
    adapted = genda.load_adapted(str(tmp_path / "out" / "genda-test-genda-generator.pt"), cfg.model, 16)
    G, _ = genda.load_source(cfg.model, 16, cfg.genda.source)
    assert all(torch.equal(a, b) for a, b in zip(adapted.G.state_dict().values(), G.state_dict().values()))
    assert not torch.equal(adapted.adaptor.b, torch.zeros(8))
    assert (tmp_path / "out" / "genda-test-genda-samples.png").exists()


@pytest.mark.slow
def test_on_two_workers_a_killed_worker_resumes_and_the_adaptation_continues_exactly(ray_cluster, tmp_path):
    """DDP over the adaptor and the classifier on 2 Ray Train workers; rank 1 SIGKILLed at step 5, the run restarts
    from its last checkpoint (adaptor, classifier, both optimizers, the RNG) and reaches the same losses at every
    step as a run that was never killed."""
    import json

    from labtrain.train import run
    from labtrain.train.session import drill_marker

    cfg = config(tmp_path)
    write_source(cfg)

    runs = {}

    def adapt(name: str, **run_fields) -> dict:
        c = cfg.model_copy(update={"genda": cfg.genda.model_copy(update={"steps": 6}),
                                   "run": cfg.run.model_copy(update={"name": name, "num_workers": 2, "cpus_per_worker": 1, **run_fields})})
        runs[name] = c.run
        assert run(genda.train, c, c.run, kind="gan").error is None
        return json.loads((tmp_path / "out" / f"{name}-genda.json").read_text())

    want = adapt("reference")["history"]
    report = adapt("killed", kill_worker_at_step=5, max_failures=1)
    # once, from a checkpoint before the kill (the step-4 one can still be in flight to Ray Train when rank 1 dies)
    assert report["resumed_from"] in ([2], [4]), "the killed run restarted once, from a checkpoint before the kill"
    assert not os.path.exists(drill_marker(runs["killed"])), "the finished run removed its drill marker from the temp folder"
    got = report["history"]
    assert [h["step"] for h in got] == list(range(1, 7))
    for a, b in zip(got, want):
        for key in ("loss_generator", "loss_discriminator", "real_score", "fake_score"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), f"step {a['step']} {key}"
