"""Step-time overhead of labtrain.train, measured side by side in one run; the last line is one JSON object.

The same small model, batch and optimizer are stepped (a) in a bare PyTorch loop in this process and
(b) through ``labtrain.train.run`` with one Ray Train worker (Session.step: strategy, metrics, timing).
Both use one intra-op thread (Ray gives a 1-CPU worker one) and in-memory batches, so the ratio is the
runner's own cost: ``labtrain_vs_bare_step_time`` = median step time (b) / median step time (a), goal <= 1.03.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from pydantic import Field

from labtrain.config import Config, RunConfig

WIDTH, DEPTH, BATCH = 512, 4, 128


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(DEPTH):
        layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(WIDTH, 10))


def batches(n: int):
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        yield torch.randn(BATCH, WIDTH, generator=g), torch.randint(0, 10, (BATCH,), generator=g)


def bare_loop(model, optimizer, data) -> list[float]:
    times = []
    last = time.perf_counter()
    for x, y in data:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        float(loss.detach())
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times


def bare_step_times(num_steps: int) -> list[float]:
    torch.set_num_threads(1)
    model = make_model()
    return bare_loop(model, torch.optim.Adam(model.parameters(), lr=1e-3), batches(num_steps))


class BenchConfig(Config):
    run: RunConfig
    num_steps: int = Field(ge=10, description="steps per block")
    rounds: int = Field(ge=1, description="bare and labtrain blocks, alternating")
    out: str = Field(description="JSON file the worker writes its step times to")


def labtrain_train(session, cfg: BenchConfig) -> None:
    """In the one worker process, alternate blocks of bare steps and of labtrain steps."""
    torch.set_num_threads(1)
    model = make_model()
    model, optimizer, _ = session.prepare(model, torch.optim.Adam(model.parameters(), lr=1e-3), batch_size=BATCH)
    plain = make_model()
    plain_optimizer = torch.optim.Adam(plain.parameters(), lr=1e-3)
    bare, ours = [], []
    warm = cfg.num_steps // 10
    for _ in range(cfg.rounds):
        bare += bare_loop(plain, plain_optimizer, batches(cfg.num_steps))[warm:]
        times = []
        last = time.perf_counter()
        for x, y in batches(cfg.num_steps):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            session.step(loss, num_samples=BATCH)
            now = time.perf_counter()
            times.append(now - last)
            last = now
        ours += times[warm:]
    with open(cfg.out, "w") as f:
        json.dump({"bare": bare, "labtrain": ours}, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    num_steps, rounds = (100, 3) if args.quick else (200, 8)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from labtrain.train import run

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "step_times.json")
            cfg = BenchConfig(run=RunConfig(name="overhead", num_workers=1, storage_path=tmp), num_steps=num_steps, rounds=rounds, out=out)
            driver_bare = bare_step_times(num_steps * rounds)[num_steps // 10:]
            run(labtrain_train, cfg, cfg.run, kind="bench")
            with open(out) as f:
                worker = json.load(f)
    finally:
        ray.shutdown()
    bare, ours, driver = (statistics.median(t) for t in (worker["bare"], worker["labtrain"], driver_bare))
    print(f"in the Ray Train worker: bare {bare * 1e3:.3f} ms/step, labtrain {ours * 1e3:.3f} ms/step; "
          f"bare in this process {driver * 1e3:.3f} ms/step", file=sys.stderr)
    print(json.dumps({
        "steps": num_steps * rounds, "model": f"MLP {DEPTH}x{WIDTH}", "batch_size": BATCH,
        "bare_step_ms": round(bare * 1e3, 3), "labtrain_step_ms": round(ours * 1e3, 3),
        "labtrain_vs_bare_step_time": round(ours / bare, 3),
        "driver_bare_step_ms": round(driver * 1e3, 3),
        "labtrain_vs_driver_bare_step_time": round(ours / driver, 3),
    }))


if __name__ == "__main__":
    main()
