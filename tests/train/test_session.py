"""The session's API in one process: precision, what prepare returns, and mistakes it refuses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from labtrain.config import RunConfig
from labtrain.train import Session


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.fixture
def one_rank_group(monkeypatch):
    import socket

    import torch.distributed as torch_dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():  # what a launcher sets
        monkeypatch.setenv(key, value)
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    torch_dist.destroy_process_group()


@pytest.mark.parametrize("strategy", ["ddp", "accelerate", "deepspeed"])  # DeepSpeed turned an outer autocast off unless its config asks
def test_bf16_runs_the_forward_under_autocast_and_keeps_fp32_weights_and_outputs(strategy, request):
    if strategy == "deepspeed":  # its engine wants a process group: one of one rank, over gloo
        request.getfixturevalue("one_rank_group")
    session = Session(RunConfig(num_workers=1, strategy=strategy, precision="bf16", tensorboard=False), kind="test")
    module = net()
    seen = []
    module[0].register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    model, optimizer = session.prepare(module, torch.optim.SGD(module.parameters(), lr=0.1))
    before = module[0].weight.detach().clone()
    out = model(torch.randn(5, 4))
    assert seen == [torch.bfloat16]
    loss = F.cross_entropy(out.float(), torch.zeros(5, dtype=torch.long))
    session.backward(loss, model=model)
    optimizer.step()
    assert session.unwrap(model)[0].weight.dtype == torch.float32 and not torch.equal(session.unwrap(model)[0].weight, before)
    if strategy == "deepspeed":
        # On a GPU, DeepSpeed's engine turns an enclosing CUDA autocast off unless its config has a torch_autocast
        # section (torch.is_autocast_enabled() looks at CUDA only, so on CPU the hook above cannot show it): the
        # engine must carry the section, with no gradient reduced in bf16 (as under DDP).
        engine = session.strategy.entries[0].wrapped
        assert engine.torch_autocast_enabled() and engine.torch_autocast_dtype() == torch.bfloat16
        assert engine.torch_autocast_lower_precision_safe_modules() == []


@pytest.mark.parametrize("strategy", ["ddp", "accelerate"])  # DeepSpeed's engine sits in the same Autocast as DDP's model
def test_bf16_hands_back_every_floating_output_as_fp32_even_in_a_dataclass(strategy):
    """A job's loss reads what the forward returns: with bf16 some of it is bf16 (Linear), some fp32 (LayerNorm), and
    a loss mixing them fails; VATT returns a dataclass, which Accelerate's own conversion passed through as it was."""
    import dataclasses

    @dataclasses.dataclass
    class Out:
        projected: torch.Tensor
        normed: torch.Tensor

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.norm = nn.Linear(4, 4), nn.LayerNorm(4)

        def forward(self, x):
            y = self.linear(x)
            return Out(y, self.norm(y))

    session = Session(RunConfig(num_workers=1, strategy=strategy, precision="bf16", tensorboard=False), kind="test")
    module = Two()
    model, _ = session.prepare(module, torch.optim.SGD(module.parameters(), lr=0.1))
    out = model(torch.randn(3, 4))
    assert out.projected.dtype == torch.float32 and out.normed.dtype == torch.float32
    (out.projected * out.normed).sum().backward()
    assert module.linear.weight.grad is not None


def test_fp32_is_the_default_and_has_no_autocast():
    session = Session(RunConfig(num_workers=1, tensorboard=False), kind="test")
    module = net()
    model, _, _ = session.prepare(module, torch.optim.SGD(module.parameters(), lr=0.1), None)
    assert model(torch.randn(3, 4)).dtype == torch.float32 and model is module


def test_prepare_returns_one_tuple_per_group_and_refuses_mistakes():
    session = Session(RunConfig(num_workers=1, tensorboard=False), kind="test")
    g, d, ema = net(), net(), net()
    (g2, g_opt), (d2, d_opt, d_sched), (ema2,) = session.prepare(
        (g, torch.optim.SGD(g.parameters(), lr=0.1)), (d, torch.optim.SGD(d.parameters(), lr=0.1), None), (ema,))
    assert d_sched is None and ema2 is ema
    with pytest.raises(ValueError, match="prepared 2 trained models: name the one meant with model="):
        session.backward(g2(torch.randn(2, 4)).sum())
    with pytest.raises(ValueError, match="was prepared without an optimizer"):
        session.backward(ema2(torch.randn(2, 4)).sum(), model=ema2)
    with pytest.raises(ValueError, match="was not prepared by this session"):
        session.backward(g2(torch.randn(2, 4)).sum(), model=net())
    with pytest.raises(RuntimeError, match="already called"):
        session.prepare(net(), torch.optim.SGD(net().parameters(), lr=0.1))


def test_accumulation_steps_the_optimizer_and_scheduler_every_nth_batch_only():
    session = Session(RunConfig(num_workers=1, accumulate_batches=3, tensorboard=False), kind="test")
    module = net()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    model, optimizer, scheduler = session.prepare(module, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5))
    weights = []
    for x in session.batches([torch.randn(2, 4) for _ in range(6)]):
        session.backward(model(x).sum(), model=model)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        weights.append(module[0].weight.detach().clone())
    changed = [not torch.equal(a, b) for a, b in zip(weights, weights[1:])]
    assert changed == [False, True, False, False, True]  # batches 3 and 6 end an optimizer step
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)


def test_a_run_that_lost_data_says_so_at_the_end(tmp_path, caplog):
    from labtrain.config import DataConfig
    from labtrain.data import write_shards
    from tests.data.conftest import make_samples

    pattern = write_shards(make_samples(64), str(tmp_path), max_samples=16, progress=False)
    (tmp_path / "shard-000001.tar").write_bytes((tmp_path / "shard-000001.tar").read_bytes()[:1000])  # cut short
    session = Session(RunConfig(num_workers=1, tensorboard=False), kind="test")
    data = session.data(DataConfig(urls=pattern, batch_size=8, max_bad_shards=1))
    assert sum(1 for _ in session.batches(data)) == 8  # full batches all the same
    with caplog.at_level("WARNING"):
        session.close()
    assert "rank 0: 16 samples (25.0% of the 64 it read) were lost" in caplog.text and "shard-000001.tar" in caplog.text
