"""The contrastive pieces: InfoNCE's positive, the queue, the momentum update, negatives gathered over ranks."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from jobs.video_ssl.config import ObjectiveConfig, VideoSSLConfig
from jobs.video_ssl.losses import info_nce, objective
from jobs.video_ssl.model import Encoder, KeyEncoder
from tests.conftest import free_port

SMALL = {"model": {"stem_width": 8, "widths": [8, 8], "blocks": [1, 1], "groups": 4},
         "sampling": {"num_frames": 4, "crop_size": 16}, "objective": {"dim": 16, "hidden": 16, "queue_size": 6}}


def cfg_with(name: str, **objective) -> VideoSSLConfig:
    return VideoSSLConfig.model_validate({"data": {"urls": "x"}, "eval": {"urls": "y"}, **SMALL, "objective": {**SMALL["objective"], "name": name, **objective}})


def test_info_nce_rewards_the_positive_at_its_index():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(4, 8), dim=1)
    keys = torch.cat([F.normalize(torch.randn(4, 8), dim=1), q])  # rank 1's keys are the queries themselves
    at_rank1 = torch.arange(4) + 4
    aligned, pos, neg = info_nce(q, keys, torch.empty(0, 8), positive_at=at_rank1, temperature=0.1)
    wrong, _, _ = info_nce(q, keys, torch.empty(0, 8), positive_at=torch.arange(4), temperature=0.1)
    assert aligned < wrong and pos == pytest.approx(1.0) and neg < 0.9


def test_the_queue_keeps_the_newest_keys_and_the_key_encoder_follows_by_momentum():
    cfg = cfg_with("vthcl", stages=[2])
    query = Encoder(cfg)
    key = KeyEncoder(query, queue_size=6, dim=16)
    assert len(key.negatives("stage2")) == 0, "the random initial queue is never used as negatives"
    batches = [torch.full((4, 16), float(i)) for i in range(3)]
    for b in batches:
        key.enqueue({"stage2": b})
    kept = key.negatives("stage2")
    assert len(kept) == 6 and sorted(kept[:, 0].tolist()) == [1, 1, 2, 2, 2, 2]
    before = next(key.encoder.parameters()).clone()
    with torch.no_grad():
        for p in query.parameters():
            p.add_(1.0)
    key.momentum_update(query, 0.9)
    after = next(key.encoder.parameters())
    torch.testing.assert_close(after, 0.9 * before + 0.1 * next(query.parameters()))


def test_vthcl_has_a_loss_per_stage_and_rspnet_a_speed_ranking():
    torch.manual_seed(0)
    clips = torch.randn(4, 3, 3, 4, 16, 16)
    for name, expected in (("vthcl", {"loss_stage1", "loss_stage2"}), ("infonce", {"loss_stage2"}), ("rspnet", {"loss_stage2", "loss_rank", "speed_acc"}), ("supervised", {"train_acc"})):
        cfg = cfg_with(name, stages=[1, 2])
        query = Encoder(cfg)
        out = objective(query, KeyEncoder(query, 6, 16), clips, cfg.objective, torch.tensor([0, 1, 2, 3]))
        assert expected <= set(out.signals), name
        out.loss.backward()
        assert all(p.grad is not None for p in query.parameters()), f"{name}: every parameter of the query encoder is trained"


def _two_rank_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    q, k = F.normalize(torch.randn(8, 16), dim=1), F.normalize(torch.randn(8, 16), dim=1)
    mine = slice(rank * 4, rank * 4 + 4)

    class Fixed(torch.nn.Module):  # an "encoder" that returns the precomputed embeddings of its input ids
        def __init__(self, table):
            super().__init__()
            self.table = table

        def forward(self, ids):
            return {"stage1": self.table[ids[:, 0, 0, 0, 0].long()]}

        def negatives(self, name):
            return torch.empty(0, 16)

    ids = torch.arange(8).float().view(8, 1, 1, 1, 1).expand(8, 2, 1, 1, 1)[mine]
    loss = objective(Fixed(q), Fixed(k), ids.unsqueeze(2), ObjectiveConfig(name="vthcl", stages=[1], temperature=0.1)).loss
    torch.save(loss.item(), f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_negatives_are_gathered_across_ranks(tmp_path):
    """Two gloo ranks with 4 videos each see the same loss as one process over all 8: each query is
    contrasted with every rank's keys, its own at its global index."""
    out = str(tmp_path / "loss")
    mp.spawn(_two_rank_worker, args=(free_port(), out), nprocs=2, join=True)
    torch.manual_seed(0)
    q, k = F.normalize(torch.randn(8, 16), dim=1), F.normalize(torch.randn(8, 16), dim=1)
    whole = F.cross_entropy(q @ k.T / 0.1, torch.arange(8)).item()
    per_rank = [torch.load(f"{out}.{r}") for r in range(2)]
    assert sum(per_rank) / 2 == pytest.approx(whole, rel=1e-5)
    local_only = F.cross_entropy(q[:4] @ k[:4].T / 0.1, torch.arange(4)).item()
    assert per_rank[0] != pytest.approx(local_only, rel=1e-3), "rank 0 must see rank 1's keys as negatives"


def test_base_preset_is_r3d18():
    from labtrain.config import load_config
    from tests.conftest import REPO

    cfg = load_config(VideoSSLConfig, REPO / "jobs/video_ssl/configs/base.yaml")
    backbone = Encoder(cfg).backbone
    assert [len(stage) for stage in backbone.stages] == [2, 2, 2, 2]
    assert 33.0e6 < sum(p.numel() for p in backbone.parameters()) < 33.4e6  # R3D-18: 33.2M
    assert cfg.sampling.span(cfg.sampling.fast_stride) == 61 and cfg.objective.queue_size == 16384
