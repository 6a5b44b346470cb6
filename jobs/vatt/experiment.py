"""Does harmonization help, and does the conflict score find misaligned triplets?

For each seed and each share of misaligned triplets (default 0% and 30%), train VATT with harmonization
off and on (same data, same seed) through the real training function, then record:
- ``conflict_auroc``: AUROC of the conflict score (-cosine of the per-sample gradients) for flagging the
  planted misaligned triplets, over the last epoch (measured every step, also when harmonization is off);
- ``retrieval_r1/r5/r10`` on the clean held-out split, and the linear-probe accuracy.
Runs use Ray Train's local mode (``run.num_workers=0``: the training function in this process), so a
sweep costs no cluster start per run. Writes ``<out>/experiment.json`` and ``experiment.png``.

    python -m jobs.vatt.experiment --config jobs/vatt/configs/tiny.yaml --seeds 0 1 2 [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile

from rich.console import Console
from rich.table import Table

from jobs.vatt.__main__ import prepare
from jobs.vatt.config import VattConfig
from jobs.vatt.evaluate import jsonable
from jobs.vatt.train import train
from labtrain.config import load_config
from labtrain.train import run

console = Console()
METRICS = ("conflict_auroc", "conflict_auroc_last_epoch", "retrieval_r1", "retrieval_r10", "retrieval_class_r1", "linear_probe_accuracy")
SETTINGS = {"plain": {"realign": False, "curriculum": "none"}, "harmonized": {"realign": True, "curriculum": "hard"}}


def corpus(base: VattConfig, root: str, seed: int, misaligned: float) -> VattConfig:
    """``base`` with its own synthetic corpus (written once, shared by the plain and harmonized runs)."""
    data_dir = os.path.join(root, f"data-s{seed}-m{int(misaligned * 100)}")
    cfg = base.model_copy(update={
        "synthetic": base.synthetic.model_copy(update={"seed": seed, "misaligned": misaligned, "write": True}),  # this command writes its corpora
        "data": base.data.model_copy(update={"urls": os.path.join(data_dir, "train", os.path.basename(base.data.urls))}),
        "eval": base.eval.model_copy(update={"urls": os.path.join(data_dir, "eval", os.path.basename(base.eval.urls))}),
        "run": base.run.model_copy(update={"num_workers": 0, "storage_path": os.path.join(root, "ckpt")}),
        "out_dir": os.path.join(root, "out"),
        "log_every": 1,  # measure the conflict score on every step, harmonized or not
    })
    return prepare(cfg)


def one_run(cfg: VattConfig, setting: str) -> dict:
    name = f"exp-s{cfg.synthetic.seed}-m{int(cfg.synthetic.misaligned * 100)}-{setting}"
    cfg = cfg.model_copy(update={"harmonize": cfg.harmonize.model_copy(update=SETTINGS[setting]), "run": cfg.run.model_copy(update={"name": name})})
    result = run(train, cfg, cfg.run, kind="vatt")
    if result.error is not None:
        raise RuntimeError(f"run {name} failed: {result.error}")
    keys = ("conflict_auroc", "conflict_auroc_last_epoch", "retrieval_r1", "retrieval_r5", "retrieval_r10", "retrieval_class_r1", "linear_probe_accuracy", "ceiling_r1")
    return {"seed": cfg.synthetic.seed, "misaligned": cfg.synthetic.misaligned, "setting": setting, **{k: result.metrics[k] for k in keys}}


def summarize(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["misaligned"], row["setting"]), []).append(row)
    out = []
    for (misaligned, setting), members in sorted(groups.items()):
        entry = {"misaligned": misaligned, "setting": setting, "seeds": len(members)}
        for key in METRICS:
            values = [m[key] for m in members if not math.isnan(m[key])]
            entry[key] = statistics.mean(values) if values else float("nan")
            entry[key + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def plot(summary: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    labels = [f"{int(s['misaligned'] * 100)}% {s['setting']}" for s in summary]
    for ax, key, title in ((axes[0], "conflict_auroc", "AUROC of the conflict score"), (axes[1], "retrieval_r1", "text-to-video R@1 (clean split)")):
        ax.bar(labels, [s[key] for s in summary], yerr=[s[key + "_sd"] for s in summary], color=["tab:gray", "tab:blue"] * (len(summary) // 2 + 1))
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=20)
    axes[0].axhline(0.5, color="k", lw=0.8, ls="--")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.vatt.experiment", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--misaligned", type=float, nargs="+", default=[0.0, 0.3])
    parser.add_argument("--out", default=None, help="output folder (default: a new temporary folder)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    base = load_config(VattConfig, args.config, args.overrides)
    root = args.out or tempfile.mkdtemp(prefix="vatt-experiment-")
    os.makedirs(root, exist_ok=True)
    rows = []
    for seed in args.seeds:
        for misaligned in args.misaligned:
            cfg = corpus(base, root, seed, misaligned)
            rows += [one_run(cfg, setting) for setting in SETTINGS]
    summary = summarize(rows)
    table = Table(title="VATT harmonization experiment (mean ± sd over seeds)")
    for col in ("misaligned", "setting", "seeds", "conflict AUROC", "(last epoch)", "R@1", "R@10", "class R@1", "probe acc"):
        table.add_column(col)
    for s in summary:
        table.add_row(f"{s['misaligned']:.0%}", s["setting"], str(s["seeds"]), *(f"{s[k]:.3f} ± {s[k + '_sd']:.3f}" for k in METRICS))
    console.print(table)
    with open(os.path.join(root, "experiment.json"), "w") as f:
        json.dump(jsonable({"runs": rows, "summary": summary, "config": base.model_dump(mode="json")}), f, indent=1, allow_nan=False)
    plot(summary, os.path.join(root, "experiment.png"))
    console.print(f"wrote {root}/experiment.json and experiment.png")
    print(json.dumps(jsonable({"summary": summary})))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
