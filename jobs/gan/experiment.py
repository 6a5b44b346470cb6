"""Does InsGen beat the ADA baseline with 100 training images, and could the experiment show it?

Arms, each seed, the same corpus and the same FID_domain extractor (one file, named by its hash):
- ``ada``: StyleGAN2 + ADA on ``--images`` training images (the baseline);
- ``insgen``: the same plus InsGen's real/fake instance discrimination and G diversity term;
- ``oracle``: the ADA baseline on ``--oracle-images`` training images (the data-rich control: if it does not
  beat ``ada``, the budget is too short for the data regime to matter, and no method could show a gain);
- the real-vs-real floor (held-out real images at the same N): what a perfect generator scores.
Reported: FID_domain, KID, mode coverage and the high-quality share per arm (mean ± sd over seeds), and the
paired InsGen/ADA FID ratio and difference per seed (goal: InsGen <= 0.8x the baseline's FID_domain).
Runs use Ray Train's local mode (one process); a run whose report with the same config is in ``<out>/out`` is
not run again. Writes ``<out>/experiment.json``, ``.md`` and ``.png``.

    python -m jobs.gan.experiment --config jobs/gan/configs/tiny.yaml --seeds 0 1 2 [key=value ...]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import tempfile

from rich.console import Console
from rich.table import Table

from jobs.gan.__main__ import prepare
from jobs.gan.config import GANConfig
from jobs.gan.train import train
from labtrain.config import load_config
from labtrain.train import run

console = Console()
SCORES = ("fid", "kid", "mode_coverage", "high_quality")


def corpus_urls(folder: str) -> str:
    """The shards of ``folder``: those written there by an earlier run of the experiment (reused as they are:
    delete the folder to write them anew), or a pattern wide enough for the writer to fill."""
    written = sorted(glob.glob(os.path.join(folder, "shard-*.tar")))
    last = len(written) - 1 if written else 999
    return os.path.join(folder, f"shard-{{000000..{last:06d}}}.tar")


def finished(cfg: GANConfig) -> dict | None:
    """The report of a run of exactly this config that already ended (an interrupted experiment goes on where it
    stopped; seeds run as separate processes into one folder are summarised by one more run over all of them)."""
    path = os.path.join(cfg.out_dir, f"{cfg.run.name}-eval.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        report = json.load(f)
    return report if report.get("config") == cfg.model_dump(mode="json") else None


def one_run(base: GANConfig, root: str, seed: int, arm: str) -> dict:
    name = f"exp-{arm}-s{seed}"
    cfg = base.model_copy(update={
        "seed": seed,
        "data": base.data.model_copy(update={"seed": seed}),
        "insgen": base.insgen.model_copy(update={"enabled": arm == "insgen"}),
        "run": base.run.model_copy(update={"num_workers": 0, "name": name, "storage_path": os.path.join(root, "ckpt")}),
        "out_dir": os.path.join(root, "out"),
    })
    report = finished(cfg)
    if report is None:
        result = run(train, cfg, cfg.run, kind="gan")
        if result.error is not None:
            raise RuntimeError(f"run {name} failed: {result.error}")
        report = finished(cfg)
    return {"seed": seed, "arm": arm, **{k: report[k] for k in SCORES}, "fid_floor": report["fid_floor"], "kid_floor": report["kid_floor"],
            "metric": report["metric"], "num_generated": report["num_generated"], "fid_curve": [[e["step"], e["fid"]] for e in report["evaluations"]]}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: list[dict]) -> dict:
    arms = sorted({r["arm"] for r in rows}, key=[r["arm"] for r in rows].index)
    out: dict = {"arms": {}}
    for arm in arms:
        members = [r for r in rows if r["arm"] == arm]
        out["arms"][arm] = {k: _mean_sd([m[k] for m in members]) for k in SCORES} | {"seeds": len(members)}
    out["floor"] = _mean_sd([r["fid_floor"] for r in rows])
    by_seed = {(r["arm"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    for arm in ("insgen", "oracle"):
        pairs = [(by_seed[(arm, s)]["fid"], by_seed[("ada", s)]["fid"]) for s in seeds if (arm, s) in by_seed and ("ada", s) in by_seed]
        if pairs:
            out[f"{arm}_vs_ada_fid_ratio"] = _mean_sd([a / b for a, b in pairs])
            out[f"{arm}_minus_ada_fid"] = _mean_sd([a - b for a, b in pairs])
            out[f"{arm}_minus_ada_coverage"] = _mean_sd([by_seed[(arm, s)]["mode_coverage"] - by_seed[("ada", s)]["mode_coverage"] for s in seeds
                                                         if (arm, s) in by_seed and ("ada", s) in by_seed])
    return out


def markdown(summary: dict, rows: list[dict], images: int, oracle_images: int) -> str:
    metric = rows[0]["metric"]
    lines = [f"| arm | training images | seeds | {metric} | KID | mode coverage | high-quality share |", "|---|---|---|---|---|---|---|"]
    for arm, s in summary["arms"].items():
        n = oracle_images if arm == "oracle" else images
        lines.append(f"| {arm} | {n} | {s['seeds']} | {s['fid'][0]:.2f} ± {s['fid'][1]:.2f} | {s['kid'][0]:.3f} ± {s['kid'][1]:.3f} | "
                     f"{s['mode_coverage'][0]:.2f} ± {s['mode_coverage'][1]:.2f} | {s['high_quality'][0]:.2f} ± {s['high_quality'][1]:.2f} |")
    lines.append(f"| real vs real (floor) | - | - | {summary['floor'][0]:.2f} | - | - | - |")
    for arm in ("insgen", "oracle"):
        if f"{arm}_vs_ada_fid_ratio" in summary:
            r, d, c = summary[f"{arm}_vs_ada_fid_ratio"], summary[f"{arm}_minus_ada_fid"], summary[f"{arm}_minus_ada_coverage"]
            lines.append(f"\n{arm} vs ada, paired per seed: {metric} ratio {r[0]:.3f} ± {r[1]:.3f}, difference {d[0]:+.2f} ± {d[1]:.2f}, "
                         f"mode coverage difference {c[0]:+.2f} ± {c[1]:.2f}")
    lines.append(f"\nN = {rows[0]['num_generated']} generated images per score (compare only at equal N)")
    return "\n".join(lines)


def plot(rows: list[dict], summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    colors = {"ada": "tab:gray", "insgen": "tab:blue", "oracle": "tab:green"}
    for r in rows:
        steps, fids = zip(*r["fid_curve"])
        axes[0].plot(steps, fids, color=colors[r["arm"]], alpha=0.7, label=r["arm"] if r["seed"] == rows[0]["seed"] else None)
    axes[0].axhline(summary["floor"][0], color="k", ls="--", lw=1, label="real vs real")
    axes[0].set(title=f"{rows[0]['metric']} over training (each seed)", xlabel="step", yscale="log")
    axes[0].legend(fontsize=7)
    arms = list(summary["arms"])
    axes[1].bar(range(len(arms)), [summary["arms"][a]["mode_coverage"][0] for a in arms], yerr=[summary["arms"][a]["mode_coverage"][1] for a in arms],
                color=[colors[a] for a in arms])
    axes[1].set_xticks(range(len(arms)), arms)
    axes[1].set(title="mode coverage (share of the 10 modes)", ylim=(0, 1.05))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.gan.experiment", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=["ada", "insgen", "oracle"], choices=["ada", "insgen", "oracle"])
    parser.add_argument("--images", type=int, default=100, help="training images of the ada and insgen arms")
    parser.add_argument("--oracle-images", type=int, default=2000, help="training images of the oracle arm")
    parser.add_argument("--out", default=None, help="output folder (default: a new temporary folder)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    root = args.out or tempfile.mkdtemp(prefix="gan-experiment-")
    os.makedirs(root, exist_ok=True)
    common = [f"eval.urls={corpus_urls(root + '/data/eval')}", "corpus.write=true", *args.overrides]
    limited = prepare(load_config(GANConfig, args.config, [f"data.urls={corpus_urls(root + '/data/train')}", f"corpus.num_images={args.images}", *common]))
    bases = {"ada": limited, "insgen": limited}
    if "oracle" in args.arms:  # the same held-out set and extractor; more training images of the same corpus
        bases["oracle"] = prepare(load_config(GANConfig, args.config, [f"data.urls={corpus_urls(root + '/data/train-oracle')}",
                                                                         f"corpus.num_images={args.oracle_images}", *common, f"eval.urls={limited.eval.urls}"]))
    # every arm takes the same number of steps (one process: batch data.batch_size); the oracle's epochs shrink with its larger set
    steps = limited.epochs * (args.images // limited.data.batch_size)
    if "oracle" in bases:
        bases["oracle"] = bases["oracle"].model_copy(update={"epochs": max(1, round(steps / (args.oracle_images // limited.data.batch_size)))})
    rows = []
    for seed in args.seeds:
        for arm in args.arms:
            rows.append(one_run(bases[arm], root, seed, arm))
            console.print({k: v for k, v in rows[-1].items() if k != "fid_curve"})
    summary = summarize(rows)
    table = Table(title=f"GAN: {rows[0]['metric']} and mode coverage (mean ± sd over seeds, N={rows[0]['num_generated']})")
    for col in ("arm", "seeds", rows[0]["metric"], "KID", "mode coverage", "high quality"):
        table.add_column(col)
    for arm, s in summary["arms"].items():
        table.add_row(arm, str(s["seeds"]), f"{s['fid'][0]:.2f} ± {s['fid'][1]:.2f}", f"{s['kid'][0]:.3f} ± {s['kid'][1]:.3f}",
                      f"{s['mode_coverage'][0]:.2f} ± {s['mode_coverage'][1]:.2f}", f"{s['high_quality'][0]:.2f} ± {s['high_quality'][1]:.2f}")
    console.print(table)
    write_outputs(os.path.join(root, "experiment"), rows, summary, limited, markdown(summary, rows, args.images, args.oracle_images), plot)
    return 0


def write_outputs(stem: str, rows: list[dict], summary: dict, cfg: GANConfig, md: str, draw) -> None:
    """Print the table; write ``<stem>.json`` (runs, summary, config), ``.md`` and ``.png`` (``draw(rows, summary, path)``);
    the summary as the last line of output (one JSON line)."""
    console.print(md)
    with open(stem + ".json", "w") as f:
        json.dump({"runs": rows, "summary": summary, "config": cfg.model_dump(mode="json")}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(md + "\n")
    draw(rows, summary, stem + ".png")
    console.print(f"wrote {stem}.json, .md and .png")
    print(json.dumps({"summary": summary}))


if __name__ == "__main__":
    raise SystemExit(main())
