"""Cost of gradient harmonization in a VATT training step, measured side by side; last line one JSON object.

Same model, same batch, same optimizer, one process: blocks of plain VATT steps (two NCE losses, one
backward) alternate with blocks of harmonized steps (per-sample own gradients of both losses w.r.t. the
pooled video feature from two ``autograd.grad`` calls through the heads, PCGrad realignment, the conflict-score
curriculum dropping its share on every step; still one backward pass). Texts come as 3 candidates per clip (MIL-NCE). ``harmonized_vs_plain_step_time`` is the ratio of median step times (goal <= 1.10).
``naive_per_sample_vs_plain_step_time`` shows what the per-sample gradients would cost the naive way,
one backward pass per sample through the whole model (measured on a few steps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from jobs.vatt.config import HarmonizeConfig, ModelConfig
from jobs.vatt.losses import objective, symmetric_nce
from jobs.vatt.model import VattModel


def make_batch(cfg: ModelConfig, batch_size: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    video = torch.randn(batch_size, 3, cfg.num_frames, cfg.frame_size, cfg.frame_size, generator=g)
    audio = torch.randn(batch_size, cfg.audio_samples, generator=g)
    text = torch.randint(1, cfg.vocab_size, (batch_size, cfg.text_candidates, cfg.text_len), generator=g)
    return video, audio, text


def timed_steps(model, optimizer, batch, harmonize: HarmonizeConfig, num_steps: int) -> list[float]:
    times = []
    for step in range(num_steps):
        start = time.perf_counter()
        emb = model(*batch)
        loss, _ = objective(emb, harmonize, 0.07, step=step, total_steps=10 * num_steps, measure=harmonize.enabled)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def naive_step(model, optimizer, batch) -> float:
    """Per-sample gradients of both losses by one full backward pass per sample and loss."""
    start = time.perf_counter()
    emb = model(*batch)
    l_va = symmetric_nce(emb.video_va.unsqueeze(1), emb.audio_va.unsqueeze(1), 0.07)
    l_vt = symmetric_nce(emb.video_vat.unsqueeze(1), emb.text_vat, 0.07)
    params = [p for p in model.parameters() if p.requires_grad]
    for i in range(len(l_va)):
        torch.autograd.grad(l_va[i], params, retain_graph=True, allow_unused=True)
        torch.autograd.grad(l_vt[i], params, retain_graph=True, allow_unused=True)
    optimizer.zero_grad(set_to_none=True)
    ((l_va.mean() + l_vt.mean()) / 2).backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    rounds, block = (3, 5) if args.quick else (6, 10)
    torch.manual_seed(0)
    cfg = ModelConfig(frame_size=16, video_patch=(2, 4))
    model = VattModel(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = make_batch(cfg, args.batch_size)
    plain_cfg, harmonized_cfg = HarmonizeConfig(realign=False, curriculum="none"), HarmonizeConfig(realign=True, curriculum="share", score="cosine", warmup_fraction=0.0, drop_until=1.0)
    timed_steps(model, optimizer, batch, harmonized_cfg, 2)  # warm up both paths
    plain, harmonized = [], []
    for r in range(rounds):
        plain += timed_steps(model, optimizer, batch, plain_cfg, block)
        harmonized += timed_steps(model, optimizer, batch, harmonized_cfg, block)
        print(f"round {r + 1}/{rounds}: plain {statistics.median(plain) * 1e3:.1f} ms, harmonized {statistics.median(harmonized) * 1e3:.1f} ms", file=sys.stderr)
    naive = [naive_step(model, optimizer, batch) for _ in range(1 if args.quick else 2)]
    p, h, n = statistics.median(plain), statistics.median(harmonized), statistics.median(naive)
    print(json.dumps({
        "model": "tiny", "batch_size": args.batch_size, "steps_each": rounds * block,
        "plain_step_ms": round(p * 1e3, 2), "harmonized_step_ms": round(h * 1e3, 2), "naive_per_sample_step_ms": round(n * 1e3, 1),
        "harmonized_vs_plain_step_time": round(h / p, 3), "naive_per_sample_vs_plain_step_time": round(n / p, 1),
    }))


if __name__ == "__main__":
    main()
