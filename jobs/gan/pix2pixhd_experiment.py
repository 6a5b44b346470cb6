"""pix2pixHD's ablation: does feature matching, and does a second discriminator scale, bring G's images closer
to the ground truth, and could the experiment show it?

Arms, each seed, the same pairs and the same number of steps: ``full`` (feature matching, 2 scales, the code's
default), ``no_fm`` (LSGAN alone, 2 scales), ``one_scale`` (feature matching, 1 scale). Scored on the second half
of the held-out pairs by L1 and PSNR to the ground truth, beside two references that need no training: the
**oracle** (the renderer's own image without its noise: what a perfect generator makes; its error is the noise
alone) and the **class-mean baseline** (every pixel the mean colour of its class: the label map without texture).
Differences are paired per seed against ``full``. Runs use Ray Train's local mode (one process); a run whose
report with the same config is in ``<out>/out`` is not run again, so an interrupted experiment goes on. Writes
``<out>/pix2pixhd.json``, ``.md`` and ``.png``.

    python -m jobs.gan.pix2pixhd_experiment --config jobs/gan/configs/pix2pixhd-tiny.yaml --seeds 0 1 2 [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import torch
from rich.console import Console
from rich.progress import track

from jobs.gan import data
from jobs.gan.__main__ import prepare
from jobs.gan.config import GANConfig
from jobs.gan.experiment import corpus_urls, finished, write_outputs
from jobs.gan.pix2pixhd import l1_psnr, load_pairs
from jobs.gan.train import train
from labtrain.config import load_config
from labtrain.train import run

console = Console()
ARMS = {"full": {"feat_match": True, "num_d": 2}, "no_fm": {"feat_match": False, "num_d": 2}, "one_scale": {"feat_match": True, "num_d": 1}}


def one_run(base: GANConfig, root: str, seed: int, arm: str) -> dict:
    name = f"p2p-{arm}-s{seed}"
    cfg = base.model_copy(update={
        "seed": seed,
        "data": base.data.model_copy(update={"seed": seed}),
        "pix2pixhd": base.pix2pixhd.model_copy(update=ARMS[arm]),
        "run": base.run.model_copy(update={"num_workers": 0, "name": name, "storage_path": os.path.join(root, "ckpt")}),
        "out_dir": os.path.join(root, "out"),
    })
    report = finished(cfg)
    if report is None:
        result = run(train, cfg, cfg.run, kind="gan")
        if result.error is not None:
            raise RuntimeError(f"run {name} failed: {result.error}")
        report = finished(cfg)
    return {"seed": seed, "arm": arm, "l1": report["l1"], "psnr": report["psnr"], "baseline_l1": report["baseline_l1"],
            "baseline_psnr": report["baseline_psnr"], "num_scored": report["num_scored"], "curve": [[e["step"], e["psnr"]] for e in report["evaluations"]]}


def oracle(cfg: GANConfig) -> dict:
    """L1/PSNR of the noise-free renderings of the scored held-out pairs (the corpus is regenerated from its seed;
    its images must be the shards' own, or the figure would describe another set)."""
    c = cfg.corpus
    _, noisy, clean = data.labelmaps(c.eval_images, cfg.images.resolution, cfg.pix2pixhd.label_classes, seed=c.seed * 2 + 1 + 2000)
    clean_of = {n.tobytes(): k for n, k in zip(noisy, clean)}  # the data path's order is its own: match each image to its rendering
    _, images = load_pairs(cfg)
    half = len(images) // 2
    scored = [((x + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy() for x in images[half:]]
    missing = sum(x.tobytes() not in clean_of for x in scored)
    if missing:
        raise ValueError(f"eval.urls ({cfg.eval.urls}): {missing} scored images are not in the labelmaps corpus of corpus.seed={c.seed}; the oracle cannot be rebuilt")
    truth = torch.stack([torch.from_numpy(clean_of[x.tobytes()]) for x in scored]).permute(0, 3, 1, 2).float() / 127.5 - 1
    return l1_psnr(truth, images[half:])


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: list[dict], reference: dict) -> dict:
    out: dict = {"arms": {}, "oracle": reference, "baseline": {"l1": rows[0]["baseline_l1"], "psnr": rows[0]["baseline_psnr"]}}
    for arm in ARMS:
        members = [r for r in rows if r["arm"] == arm]
        if members:
            out["arms"][arm] = {"l1": _mean_sd([m["l1"] for m in members]), "psnr": _mean_sd([m["psnr"] for m in members]), "seeds": len(members)}
    by = {(r["arm"], r["seed"]): r for r in rows}
    for arm in ARMS:
        seeds = sorted(s for (a, s) in by if a == arm and ("full", s) in by)
        if arm != "full" and seeds:
            out[f"{arm}_minus_full"] = {k: _mean_sd([by[(arm, s)][k] - by[("full", s)][k] for s in seeds]) for k in ("l1", "psnr")}
            out[f"{arm}_minus_full"]["per_seed_psnr"] = [by[(arm, s)]["psnr"] - by[("full", s)]["psnr"] for s in seeds]
    return out


def markdown(summary: dict, rows: list[dict]) -> str:
    lines = ["| arm | feature matching | D scales | seeds | L1 | PSNR (dB) |", "|---|---|---|---|---|---|"]
    for arm, s in summary["arms"].items():
        lines.append(f"| {arm} | {'yes' if ARMS[arm]['feat_match'] else 'no'} | {ARMS[arm]['num_d']} | {s['seeds']} | "
                     f"{s['l1'][0]:.4f} ± {s['l1'][1]:.4f} | {s['psnr'][0]:.2f} ± {s['psnr'][1]:.2f} |")
    o, b = summary["oracle"], summary["baseline"]
    lines.append(f"| class-mean baseline (no texture) | - | - | - | {b['l1']:.4f} | {b['psnr']:.2f} |")
    lines.append(f"| oracle (the renderer without noise) | - | - | - | {o['l1']:.4f} | {o['psnr']:.2f} |")
    for arm in ARMS:
        d = summary.get(f"{arm}_minus_full")
        if d:
            per = ", ".join(f"{v:+.2f}" for v in d["per_seed_psnr"])
            lines.append(f"\n{arm} - full, paired per seed: L1 {d['l1'][0]:+.4f} ± {d['l1'][1]:.4f}, PSNR {d['psnr'][0]:+.2f} ± {d['psnr'][1]:.2f} dB (per seed {per})")
    lines.append(f"\n{rows[0]['num_scored']} held-out pairs scored; L1 and PSNR on [0, 1] pixels")
    return "\n".join(lines)


def plot(rows: list[dict], summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"full": "tab:blue", "no_fm": "tab:red", "one_scale": "tab:orange"}
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        steps, psnr = zip(*r["curve"])
        ax.plot(steps, psnr, color=colors[r["arm"]], alpha=0.7, label=r["arm"] if r["seed"] == rows[0]["seed"] else None)
    ax.axhline(summary["oracle"]["psnr"], color="k", ls="--", lw=1, label="oracle (noise only)")
    ax.axhline(summary["baseline"]["psnr"], color="gray", ls=":", lw=1, label="class-mean baseline")
    ax.set(title="pix2pixHD: held-out PSNR over training (each seed)", xlabel="step", ylabel="PSNR (dB)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.gan.pix2pixhd_experiment", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--out", default=None, help="output folder (default: a new temporary folder)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    root = args.out or tempfile.mkdtemp(prefix="pix2pixhd-experiment-")
    os.makedirs(root, exist_ok=True)
    base = prepare(load_config(GANConfig, args.config, [f"data.urls={corpus_urls(root + '/data/train')}", f"eval.urls={corpus_urls(root + '/data/eval')}",
                                                        "corpus.write=true", *args.overrides]))
    reference = oracle(base)
    rows = []
    for seed, arm in track([(s, a) for s in args.seeds for a in args.arms], description="pix2pixHD runs", console=console):
        rows.append(one_run(base, root, seed, arm))
        console.print({k: v for k, v in rows[-1].items() if k != "curve"})
    summary = summarize(rows, reference)
    write_outputs(os.path.join(root, "pix2pixhd"), rows, summary, base, markdown(summary, rows), plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
