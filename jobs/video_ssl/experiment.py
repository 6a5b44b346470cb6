"""Does self-supervised pretraining learn the sprites' classes, and does the hierarchy help?

For each seed, pretrain with each objective (default ``vthcl``, ``infonce`` = the single-stage baseline,
``rspnet``) on the same corpus through the real training function, then score the frozen backbone with a
linear probe (and a short fine-tune) on the labelled held-out split. The control is a randomly initialised
backbone of the same shape, scored the same way on the same split, per seed: every method's paired
difference against it is reported, with its spread over seeds. RSPNet's relative-speed accuracy on
held-out triplets is reported against chance (0.5). Runs use Ray Train's local mode (one process).
Writes ``<out>/experiment.json``, ``experiment.png`` and ``experiment.md``.

    python -m jobs.video_ssl.experiment --config jobs/video_ssl/configs/tiny.yaml --seeds 0 1 2 [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

from rich.console import Console
from rich.table import Table

from jobs.video_ssl.__main__ import prepare
from jobs.video_ssl.config import VideoSSLConfig
from jobs.video_ssl.train import train
from labtrain.config import load_config
from labtrain.train import run

console = Console()
SCORES = ("linear_probe", "finetune")


def one_run(base: VideoSSLConfig, root: str, seed: int, objective: str) -> dict:
    name = f"exp-{objective}-s{seed}"
    cfg = base.model_copy(update={
        "seed": seed,
        "data": base.data.model_copy(update={"seed": seed}),
        "objective": base.objective.model_copy(update={"name": objective}),
        "run": base.run.model_copy(update={"num_workers": 0, "name": name, "storage_path": os.path.join(root, "ckpt")}),
        "out_dir": os.path.join(root, "out"),
    })
    result = run(train, cfg, cfg.run, kind="video_ssl")
    if result.error is not None:
        raise RuntimeError(f"run {name} failed: {result.error}")
    with open(os.path.join(root, "out", f"{name}-eval.json")) as f:
        report = json.load(f)
    keys = [k for k in report if k.startswith(SCORES) or k in ("speed_acc_heldout", "chance")]
    last = report["history"][-20:]
    train_speed = [h["speed_acc"] for h in last if "speed_acc" in h]
    return {"seed": seed, "objective": objective, **{k: report[k] for k in keys},
            "train_speed_acc_last20": statistics.mean(train_speed) if train_speed else None}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    objectives = sorted({r["objective"] for r in rows}, key=[r["objective"] for r in rows].index)
    for objective in objectives:
        members = [r for r in rows if r["objective"] == objective]
        entry: dict = {"objective": objective, "seeds": len(members)}
        for score in SCORES:
            if score not in members[0]:
                continue
            entry[score], entry[score + "_sd"] = _mean_sd([m[score] for m in members])
            entry[score + "_random_init"], _ = _mean_sd([m[score + "_random_init"] for m in members])
            diffs = [m[score] - m[score + "_random_init"] for m in members]
            entry[score + "_gain"], entry[score + "_gain_sd"] = _mean_sd(diffs)
            entry[score + "_gain_min"] = min(diffs)
        if members[0].get("speed_acc_heldout") is not None:
            entry["speed_acc_heldout"], entry["speed_acc_heldout_sd"] = _mean_sd([m["speed_acc_heldout"] for m in members])
        out.append(entry)
    return out


def plot(rows: list[dict], summary: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, score in zip(axes, SCORES):
        names = [s["objective"] for s in summary if score in s]
        if not names:
            continue
        x = range(len(names) + 1)
        means = [s[score] for s in summary if score in s]
        random_init = statistics.mean(r[score + "_random_init"] for r in rows)
        ax.bar(x, [random_init, *means], yerr=[0, *(s[score + "_sd"] for s in summary if score in s)], color=["tab:gray", "tab:blue", "tab:orange", "tab:green"][: len(names) + 1])
        for i, name in enumerate(names, start=1):
            ax.scatter([i] * len([r for r in rows if r["objective"] == name]), [r[score] for r in rows if r["objective"] == name], color="k", s=10, zorder=3)
        ax.scatter([0] * len(rows), [r[score + "_random_init"] for r in rows], color="k", s=10, zorder=3)
        ax.axhline(rows[0]["chance"], color="k", ls="--", lw=1, label="chance")
        ax.set_xticks(list(x), ["random init", *names])
        ax.set(title=f"held-out {score.replace('_', ' ')} accuracy (dots: seeds)", ylim=(0, 1))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(summary: list[dict], rows: list[dict]) -> str:
    lines = ["| objective | seeds | linear probe | random init | paired gain (min) | fine-tune | random init | paired gain | speed acc (held-out) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        ft = (f"{s['finetune']:.3f} ± {s['finetune_sd']:.3f} | {s['finetune_random_init']:.3f} | {s['finetune_gain']:+.3f} ± {s['finetune_gain_sd']:.3f}"
              if "finetune" in s else "- | - | -")
        speed = f"{s['speed_acc_heldout']:.3f} ± {s['speed_acc_heldout_sd']:.3f}" if "speed_acc_heldout" in s else "-"
        lines.append(f"| {s['objective']} | {s['seeds']} | {s['linear_probe']:.3f} ± {s['linear_probe_sd']:.3f} | {s['linear_probe_random_init']:.3f} | "
                     f"{s['linear_probe_gain']:+.3f} ± {s['linear_probe_gain_sd']:.3f} ({s['linear_probe_gain_min']:+.3f}) | {ft} | {speed} |")
    lines.append(f"\nchance {rows[0]['chance']:.3f} (classes); speed chance 0.5")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.video_ssl.experiment", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--objectives", nargs="+", default=["vthcl", "infonce", "rspnet", "supervised"], choices=["vthcl", "infonce", "rspnet", "supervised"],
                        help="'supervised' is the oracle arm: the same backbone and budget trained on the labels")
    parser.add_argument("--out", default=None, help="output folder (default: a new temporary folder)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    root = args.out or tempfile.mkdtemp(prefix="video-ssl-experiment-")
    os.makedirs(root, exist_ok=True)
    base = load_config(VideoSSLConfig, args.config, [
        f"data.urls={root}/data/train/shard-{{000000..000099}}.tar", f"eval.urls={root}/data/eval/shard-{{000000..000099}}.tar",
        "synthetic.write=true", *args.overrides])
    base = prepare(base)  # one corpus, written once, for every run
    rows = []
    for seed in args.seeds:
        for objective in args.objectives:
            rows.append(one_run(base, root, seed, objective))
            console.print(rows[-1])
    summary = summarize(rows)
    table = Table(title="video SSL: held-out accuracy (mean ± sd over seeds); gain = paired difference against a random-init backbone")
    for col in ("objective", "seeds", "linear probe", "gain", "fine-tune", "gain", "speed acc"):
        table.add_column(col)
    for s in summary:
        table.add_row(s["objective"], str(s["seeds"]), f"{s['linear_probe']:.3f} ± {s['linear_probe_sd']:.3f}", f"{s['linear_probe_gain']:+.3f} ± {s['linear_probe_gain_sd']:.3f}",
                      f"{s.get('finetune', float('nan')):.3f}", f"{s.get('finetune_gain', float('nan')):+.3f}", f"{s.get('speed_acc_heldout', float('nan')):.3f}")
    console.print(table)
    with open(os.path.join(root, "experiment.json"), "w") as f:
        json.dump({"runs": rows, "summary": summary, "config": base.model_dump(mode="json")}, f, indent=1)
    with open(os.path.join(root, "experiment.md"), "w") as f:
        f.write(markdown(summary, rows) + "\n")
    plot(rows, summary, os.path.join(root, "experiment.png"))
    console.print(f"wrote {root}/experiment.json, experiment.md and experiment.png")
    print(json.dumps({"summary": summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
