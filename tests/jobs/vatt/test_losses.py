"""VATT losses and harmonization: against references, across 2 gloo ranks, and per-sample exactness."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from jobs.vatt.config import HarmonizeConfig, ModelConfig
from jobs.vatt.losses import bag, curriculum_threshold, objective, pair_weights, per_sample_gradients, realign, symmetric_nce, target_of
from jobs.vatt.model import VattModel


def test_nce_is_symmetric_cross_entropy_for_single_candidates():
    torch.manual_seed(0)
    a, b = torch.randn(6, 1, 8), torch.randn(6, 1, 8)
    logits = F.normalize(a[:, 0], dim=1) @ F.normalize(b[:, 0], dim=1).T / 0.07
    target = torch.arange(6)
    reference = F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.T, target, reduction="none")
    torch.testing.assert_close(symmetric_nce(a, b, 0.07), reference)
    torch.testing.assert_close(symmetric_nce(a, b, 0.07, own_only=True), reference)  # same value, fewer gradient paths


def test_mil_nce_takes_the_best_bag_of_candidates():
    torch.manual_seed(0)
    video = torch.randn(4, 1, 8)
    texts = torch.randn(4, 3, 8)
    texts[:, 1] = video[:, 0] * 5  # one of the three narrations matches its clip
    assert symmetric_nce(video, texts, 0.07).mean() < symmetric_nce(video, torch.randn(4, 3, 8), 0.07).mean()


def _ranked(rank: int, world: int, path: str, a: torch.Tensor, b: torch.Tensor, out: dict) -> None:
    torch_dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    half = len(a) // world
    mine = slice(rank * half, (rank + 1) * half)
    la, lb = a[mine].clone().requires_grad_(), b[mine].clone().requires_grad_()
    loss = symmetric_nce(la, lb, 0.07)
    own = symmetric_nce(la, lb, 0.07, own_only=True)
    loss.sum().backward()
    out[rank] = (loss.detach(), own.detach(), la.grad)
    torch_dist.destroy_process_group()


def test_two_gloo_ranks_use_the_global_batch_as_negatives(tmp_path):
    """Each rank holds half the batch; losses and gradients equal one process holding all of it."""
    torch.manual_seed(0)
    a, b = torch.randn(8, 1, 16), torch.randn(8, 1, 16)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ranked, args=(2, str(tmp_path / "store"), a, b, out), nprocs=2)
        results = dict(out)
    full_a = a.clone().requires_grad_()
    reference = symmetric_nce(full_a, b, 0.07)
    reference.sum().backward()
    torch.testing.assert_close(torch.cat([results[0][0], results[1][0]]), reference.detach())
    torch.testing.assert_close(torch.cat([results[0][1], results[1][1]]), reference.detach())
    # the gather's backward brings back the terms where a rank's samples were the other rank's negatives
    torch.testing.assert_close(torch.cat([results[0][2], results[1][2]]), full_a.grad, rtol=1e-4, atol=1e-5)


def make_model(head_norm: str = "batch_detached", candidates: int = 3):
    torch.manual_seed(0)
    cfg = ModelConfig(frame_size=8, video_patch=(2, 4), num_frames=4, audio_samples=256, audio_patch=32, text_len=4, vocab_size=32, d_model=32, d_ff=32, post_dim=16, va_dim=16, vat_dim=8, head_norm=head_norm)
    model = VattModel(cfg)
    batch = (torch.randn(6, 3, 4, 8, 8), torch.randn(6, 256), torch.randint(1, 32, (6, candidates, 4)))
    return model, batch


@pytest.fixture
def tiny_model():
    return make_model()


def _separate_passes_match(model, batch, target: str = "pooled") -> bool:
    """Do the two autograd.grad calls give what B separate backward passes (one per sample and loss) give?"""
    emb = model(*batch)
    own_va, own_vt = per_sample_gradients(emb, 0.07, target)
    Z = target_of(emb, target)
    B = len(own_va)
    for i in range(B):
        for got, (x, y) in ((own_va, (emb.video_va, emb.audio_va)), (own_vt, (emb.video_vat, emb.text_vat))):
            loss_i = symmetric_nce(bag(x), bag(y), 0.07, own_only=True)[i] / B
            expected, = torch.autograd.grad(loss_i, Z, retain_graph=True)
            if not torch.allclose(got[i], expected[i], rtol=1e-4, atol=1e-7) or expected[[j for j in range(B) if j != i]].abs().max() > 0:
                return False  # sample i's own loss must touch only row i
    return True


@pytest.mark.parametrize("head_norm,target", [("batch_detached", "pooled"), ("layer", "pooled"), ("batch_detached", "last_block")])
def test_per_sample_gradients_equal_one_backward_pass_per_sample_in_train_mode(head_norm, target):
    """In train mode (batch statistics live, dropout on), with the candidate texts of MIL-NCE, for both targets;
    VATT's own batch norm fails the same check."""
    model, batch = make_model(head_norm)
    model.train()
    assert _separate_passes_match(model, batch, target)
    mixed, batch = make_model("batch")
    mixed.train()
    assert not _separate_passes_match(mixed, batch)  # batch norm's backward mixes the samples: the check can fail


def test_detached_batch_norm_normalizes_as_batch_norm_does():
    from jobs.vatt.model import DetachedBatchNorm

    torch.manual_seed(0)
    x = torch.randn(16, 8) * 3 + 1
    ours, theirs = DetachedBatchNorm(8), torch.nn.BatchNorm1d(8)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x))


def _bn_rank(rank: int, world: int, path: str, x: torch.Tensor, out: dict) -> None:
    from jobs.vatt.model import DetachedBatchNorm

    torch_dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    half = len(x) // world
    norm = DetachedBatchNorm(x.shape[1])
    y = norm(x[rank * half:(rank + 1) * half])
    out[rank] = (y.detach(), norm.running_mean.clone(), norm.running_var.clone())
    torch_dist.destroy_process_group()


def test_detached_batch_norm_takes_the_global_batchs_statistics_across_ranks(tmp_path):
    """Cross-replica, as VATT's: two gloo ranks holding a half each normalize exactly as one process holding the
    whole batch (and keep the same running statistics), not each with its own half's statistics."""
    from jobs.vatt.model import DetachedBatchNorm

    torch.manual_seed(0)
    x = torch.randn(16, 8) * 3 + 1
    x[8:] += 5  # the halves differ: per-rank statistics would give another output
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_bn_rank, args=(2, str(tmp_path / "store"), x, out), nprocs=2)
        results = dict(out)
    whole = DetachedBatchNorm(8)
    torch.testing.assert_close(torch.cat([results[0][0], results[1][0]]), whole(x), rtol=1e-5, atol=1e-5)
    for rank in (0, 1):
        torch.testing.assert_close(results[rank][1], whole.running_mean)
        torch.testing.assert_close(results[rank][2], whole.running_var)
    per_rank = DetachedBatchNorm(8)(x[:8])
    assert not torch.allclose(results[0][0], per_rank, atol=1e-3)


def _weights(cfg: HarmonizeConfig, step: int, cos, l_va, l_vt, **flags):
    return pair_weights(cfg, step=step, total_steps=100, cos=cos, l_va=l_va, l_vt=l_vt, **flags)


def test_share_curriculum_warms_up_drops_its_share_then_keeps_everything():
    torch.manual_seed(0)
    B = 10
    cos, l_va, l_vt = torch.linspace(-1, 1, B), torch.rand(B), torch.rand(B)
    l_vt[0] = 10.0  # the lowest-cosine triplet's text pair stands out
    cfg = HarmonizeConfig(curriculum="share", score="cosine", unit="pair", warmup_fraction=0.2, drop_share=0.3, drop_until=0.8)
    for step in (0, 19, 80, 99):
        w_va, w_vt = _weights(cfg, step, cos, l_va, l_vt)
        assert w_va.sum() == w_vt.sum() == B, step  # warm-up, and after drop_until
    w_va, w_vt = _weights(cfg, 20, cos, l_va, l_vt)
    assert (2 * B - w_va.sum() - w_vt.sum()) == 3  # round(0.3 * 10) pairs
    assert w_vt[0] == 0 and w_va[0] == 1  # of triplet 0 only the pair whose loss stands out
    assert set(torch.nonzero((w_va * w_vt) == 0).flatten().tolist()) == {0, 1, 2}  # the three lowest cosines
    triplet = cfg.model_copy(update={"unit": "triplet"})
    w_va, w_vt = _weights(triplet, 50, cos, l_va, l_vt)
    assert torch.equal(w_va, w_vt) and torch.nonzero(w_va == 0).flatten().tolist() == [0, 1, 2]
    for score in ("loss", "random"):
        w_va, w_vt = _weights(cfg.model_copy(update={"score": score}), 50, None, l_va, l_vt)
        assert (2 * B - w_va.sum() - w_vt.sum()) == 3, score  # the same number of pairs, another choice
    w_va, w_vt = _weights(cfg.model_copy(update={"score": "loss"}), 50, None, l_va, l_vt)
    assert w_vt[0] == 0  # the highest loss goes first


def test_oracle_curriculum_drops_exactly_the_swapped_pairs_at_every_step():
    B = 8
    text, audio = torch.tensor([1, 0, 0, 1, 0, 0, 0, 0]), torch.tensor([0, 1, 0, 1, 0, 0, 0, 0])
    cfg = HarmonizeConfig(curriculum="share", score="oracle", warmup_fraction=0.5)
    for step in (0, 60):
        w_va, w_vt = _weights(cfg, step, None, torch.rand(B), torch.rand(B), text_swapped=text, audio_swapped=audio)
        assert torch.equal(w_vt, 1.0 - text) and torch.equal(w_va, 1.0 - audio)
    with pytest.raises(ValueError, match="needs the planted swap flags"):
        _weights(cfg, 0, None, torch.rand(B), torch.rand(B))


def test_realignment_projects_only_conflicting_pairs():
    torch.manual_seed(0)
    g_va, g_vt = torch.randn(64, 16), torch.randn(64, 16)
    cos = F.cosine_similarity(g_va, g_vt, dim=1)
    g = realign(g_va, g_vt, cos)
    agree = cos >= 0
    torch.testing.assert_close(g[agree], (g_va + g_vt)[agree])
    dot = (g_va * g_vt).sum(1, keepdim=True)
    va_p = g_va - dot / g_vt.pow(2).sum(1, keepdim=True) * g_vt
    assert ((va_p * g_vt).sum(1)[~agree].abs() < 1e-4).all()  # the projected part is orthogonal to the other
    assert ((g * g_va).sum(1)[~agree] >= -1e-5).all() and ((g * g_vt).sum(1)[~agree] >= -1e-5).all()


def test_curriculum_threshold_anneals_to_keep_everything():
    cfg = HarmonizeConfig(gamma_start=0.0, anneal_fraction=0.5)
    assert curriculum_threshold(cfg, 0, 100) == 0.0
    assert curriculum_threshold(cfg, 25, 100) == pytest.approx(-0.5)
    assert curriculum_threshold(cfg, 50, 100) == -1.0 == curriculum_threshold(cfg, 90, 100)


def test_harmonized_objective_sends_its_gradient_into_the_backbone(tiny_model):
    """Measuring alone changes nothing; realignment changes only the backbone's gradient; the curriculum
    keeps the samples at or above its threshold."""
    model, batch = tiny_model

    def grads(cfg: HarmonizeConfig, measure: bool):
        torch.manual_seed(1)  # same DropToken choice
        model.zero_grad()
        flags = {"text_swapped": torch.tensor([1, 0, 0, 0, 0, 0]), "audio_swapped": torch.zeros(6)} if cfg.score == "oracle" else {}
        loss, stats = objective(model(*batch), cfg, 0.07, step=0, total_steps=100, measure=measure, **flags)
        loss.backward()
        return loss.detach(), stats, [p.grad.clone() for p in model.backbone.video.parameters()], [p.grad.clone() for p in model.heads.parameters()]

    plain_cfg = HarmonizeConfig(realign=False, curriculum="none")
    loss_a, _, backbone_a, heads_a = grads(plain_cfg, False)
    loss_b, stats, backbone_b, heads_b = grads(plain_cfg, True)
    torch.testing.assert_close(loss_a, loss_b)
    for x, y in zip(backbone_a + heads_a, backbone_b + heads_b):
        torch.testing.assert_close(x, y)
    assert stats.cos is not None and stats.kept == 1.0

    loss_c, realigned, backbone_c, heads_c = grads(HarmonizeConfig(realign=True, curriculum="none"), True)
    torch.testing.assert_close(loss_c, loss_a)  # the realignment term has value zero
    for x, y in zip(heads_a, heads_c):
        torch.testing.assert_close(x, y)  # heads keep their ordinary gradients
    if (realigned.cos < 0).any():
        assert any(not torch.allclose(x, y) for x, y in zip(backbone_a, backbone_c))

    loss_t, tokens, backbone_t, heads_t = grads(HarmonizeConfig(realign=True, curriculum="none", target="last_block"), True)
    torch.testing.assert_close(loss_t, loss_a)
    for x, y in zip(heads_a, heads_t):
        torch.testing.assert_close(x, y)
    if (tokens.cos < 0).any():
        assert any(not torch.allclose(x, y) for x, y in zip(backbone_a, backbone_t))

    _, hard, _, _ = grads(HarmonizeConfig(realign=False, curriculum="hard", gamma_start=0.0), True)
    assert hard.kept == pytest.approx(float((hard.cos >= 0).float().mean()))

    _, oracle, _, _ = grads(HarmonizeConfig(realign=False, curriculum="share", score="oracle"), False)
    assert oracle.kept == pytest.approx((1 + 5 / 6) / 2) and oracle.cos is None  # one text pair dropped; no per-sample gradients needed


@pytest.mark.parametrize("head_norm", ["batch_detached", "layer", "batch"])
@pytest.mark.parametrize("target", ["pooled", "last_block"])
def test_harmonized_objective_runs_under_bf16_autocast(head_norm, target):
    """run.precision=bf16 wraps the model in the strategies' Autocast, which hands back fp32 copies of bf16 outputs:
    a harmonization target must still be the tensor the losses were computed from, and the detached batch norm's
    fp32 running buffers must take bf16 statistics (both failed at the first step before)."""
    from labtrain.train.strategies import Autocast

    model, batch = make_model(head_norm)
    wrapped = Autocast(model.train(), "cpu")
    emb = wrapped(*batch)
    assert emb.video_va.dtype == torch.float32  # the losses are computed at full precision
    loss, stats = objective(emb, HarmonizeConfig(realign=True, curriculum="share", target=target), 0.07, step=50, total_steps=100, measure=True)
    loss.backward()
    assert stats.cos is not None and torch.isfinite(stats.cos).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.backbone.encoder.parameters())


def test_a_step_reads_nothing_back_from_the_device(tiny_model):
    """The step's gauges stay 0-dim tensors (the logger reads them on logging steps): a float() here would make
    the host wait for the GPU every step."""
    model, batch = tiny_model
    _, stats = objective(model(*batch), HarmonizeConfig(realign=True, curriculum="share"), 0.07, step=50, total_steps=100, measure=True)
    signals = stats.signals()
    assert set(signals) == {"loss_va", "loss_vt", "kept", "conflict_rate", "mean_cos"}
    assert all(torch.is_tensor(v) and v.dim() == 0 and not v.requires_grad for v in signals.values())
    assert float(signals["kept"]) == pytest.approx(stats.kept) and float(signals["mean_cos"]) == pytest.approx(stats.mean_cos)
