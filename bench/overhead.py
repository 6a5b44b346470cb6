"""Step-time overhead of labtrain.train, measured side by side in one run; the last line is one JSON object.

The same small model, batch and optimizer are stepped (a) in a bare PyTorch loop and (b) through the
session inside a ``labtrain.train.run`` worker (session.batches, session.backward, the job's own
optimizer.step/zero_grad, session.log: strategy, metrics, timing), in alternating blocks in that one worker
process; then the same for two models stepped in turn (a GAN-like update). All use one intra-op thread (Ray
gives a 1-CPU worker one) and in-memory batches, so the ratio is the session's own cost:
``labtrain_vs_bare_step_time`` = median step time (b) / median step time (a), goal <= 1.03, and
``two_models_labtrain_vs_bare_step_time`` the same for two models. A bare loop in the driver process is
printed beside them for reference.
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


def bare_loop(models, optimizers, data) -> list[float]:
    """Plain PyTorch: each model in turn does forward, backward, step, zero_grad (two models: a GAN-like update)."""
    times = []
    last = time.perf_counter()
    for x, y in data:
        for model, optimizer in zip(models, optimizers):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        float(loss.detach())
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times


def labtrain_loop(session, models, optimizers, data, start_step: int) -> list[float]:
    """The same through the session: its batches (timing, metrics), backward, the job's steps, session.log."""
    times = []
    step = start_step
    last = time.perf_counter()
    for x, y in session.batches(data):
        for model, optimizer in zip(models, optimizers):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            session.backward(loss, model=model)
            optimizer.step()
            optimizer.zero_grad()
        step += 1
        session.log(step, loss=loss)
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times


def plain(num_models: int):
    models = [make_model() for _ in range(num_models)]
    return models, [torch.optim.Adam(m.parameters(), lr=1e-3) for m in models]


def bare_step_times(num_steps: int) -> list[float]:
    torch.set_num_threads(1)
    return bare_loop(*plain(1), batches(num_steps))


class BenchConfig(Config):
    run: RunConfig
    num_steps: int = Field(ge=10, description="steps per block")
    rounds: int = Field(ge=1, description="bare and labtrain blocks, alternating")
    out: str = Field(description="JSON file the worker writes its step times to")


def labtrain_train(session, cfg: BenchConfig) -> None:
    """In the one worker process, alternate blocks of bare steps and of labtrain steps, for one model and for
    two models stepped in turn. Both loops step the same modules and optimizers (the bare loop the plain
    ones under the session's wrappers), so memory placement cannot tell them apart: only the session's code."""
    torch.set_num_threads(1)
    models, optimizers = plain(2)
    prepared = session.prepare((models[0], optimizers[0]), (models[1], optimizers[1]))
    bare = {"one": (models[:1], optimizers[:1]), "two": (models, optimizers)}
    ours = {"one": ([prepared[0][0]], [prepared[0][1]]), "two": ([p[0] for p in prepared], [p[1] for p in prepared])}
    times: dict[str, list[float]] = {"bare": [], "labtrain": [], "bare_two": [], "labtrain_two": []}
    warm = cfg.num_steps // 10
    step = 0
    for _ in range(cfg.rounds):
        times["bare"] += bare_loop(*bare["one"], batches(cfg.num_steps))[warm:]
        times["labtrain"] += labtrain_loop(session, *ours["one"], batches(cfg.num_steps), step)[warm:]
        times["bare_two"] += bare_loop(*bare["two"], batches(cfg.num_steps))[warm:]
        times["labtrain_two"] += labtrain_loop(session, *ours["two"], batches(cfg.num_steps), step)[warm:]
        step += cfg.num_steps
    with open(cfg.out, "w") as f:
        json.dump(times, f)


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
    med = {name: statistics.median(values) for name, values in worker.items()}
    driver = statistics.median(driver_bare)
    bare, ours = med["bare"], med["labtrain"]
    print(f"in the Ray Train worker: bare {bare * 1e3:.3f} ms/step, labtrain {ours * 1e3:.3f} ms/step; two models: bare "
          f"{med['bare_two'] * 1e3:.3f}, labtrain {med['labtrain_two'] * 1e3:.3f} ms/step; bare in this process {driver * 1e3:.3f} ms/step", file=sys.stderr)
    print(json.dumps({
        "steps": num_steps * rounds, "model": f"MLP {DEPTH}x{WIDTH}", "batch_size": BATCH,
        "bare_step_ms": round(bare * 1e3, 3), "labtrain_step_ms": round(ours * 1e3, 3),
        "labtrain_vs_bare_step_time": round(ours / bare, 3),
        "two_models_bare_step_ms": round(med["bare_two"] * 1e3, 3), "two_models_labtrain_step_ms": round(med["labtrain_two"] * 1e3, 3),
        "two_models_labtrain_vs_bare_step_time": round(med["labtrain_two"] / med["bare_two"], 3),
        "driver_bare_step_ms": round(driver * 1e3, 3),
        "labtrain_vs_driver_bare_step_time": round(ours / driver, 3),
    }))


if __name__ == "__main__":
    main()
