"""Which per-sample gradient flags a misaligned triplet? The conflict score at three targets, side by side.

The experiment (``jobs.vatt.experiment``) found the cosine of the two losses' per-sample gradients a weak flag
(AUROC 0.60-0.66) at the pooled video feature and at the video tokens entering the shared backbone's last
block. The option it did not try is the one the paper's abstract names: conflicts in the *shared backbone's*
parameters. There a sample's video-audio gradient also reaches the block through the audio path and its
video-text gradient through the text path, so the score is not a function of the video path alone.

This runs plain training (the ``plain`` arm's settings, in one process, no Ray) on the experiment's corpus and,
every ``--every`` steps, scores the batch before its step with each target:
- ``pooled``: the pooled video feature (``harmonize.target=pooled``);
- ``tokens``: the video tokens entering the last block (``harmonize.target=last_block``);
- ``params``: the parameters of the shared backbone's last block and final norm, one ``autograd.grad`` per
  sample and loss (2B partial backward passes: a measurement, too slow to train with);
and the per-triplet loss (the loss-based arm's score). It reports each score's AUROC for misaligned triplets
over the early, middle and late thirds of training, per seed, and the paired differences against ``pooled``.

    python -m jobs.vatt.conflict_targets --config jobs/vatt/configs/tiny.yaml --seeds 0 1 2 3 4 epochs=12 data.batch_size=64 lr=1e-3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from jobs.vatt.config import VattConfig
from jobs.vatt.data import TripletDecoder, to_tensors
from jobs.vatt.evaluate import auroc
from jobs.vatt.experiment import corpus
from jobs.vatt.losses import bag, cosine_rows, per_sample_gradients, symmetric_nce
from jobs.vatt.model import VattModel
from jobs.vatt.train import lr_schedule
from labtrain.config import load_config
from labtrain.data import DataStream

TARGETS = ("pooled", "tokens", "params", "loss")
THIRDS = ("early", "middle", "late")


def shared_block_parameters(model: VattModel) -> list[torch.nn.Parameter]:
    """The shared backbone's last block and its final norm: what every modality's last computation shares."""
    backbone = model.backbone
    return [*backbone.encoder.layers[-1].parameters(), *backbone.norm.parameters()]


def param_cosines(emb, temperature: float, params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Each sample's cosine between its own video-audio and video-text gradients w.r.t. ``params`` (B,)."""
    own_va = symmetric_nce(bag(emb.video_va), bag(emb.audio_va), temperature, own_only=True)
    own_vt = symmetric_nce(bag(emb.video_vat), bag(emb.text_vat), temperature, own_only=True)
    out = []
    for i in range(len(own_va)):
        g_va = torch.autograd.grad(own_va[i], params, retain_graph=True, allow_unused=True)
        g_vt = torch.autograd.grad(own_vt[i], params, retain_graph=True, allow_unused=True)
        flat_va = torch.cat([g.flatten() for g in g_va if g is not None])
        flat_vt = torch.cat([g.flatten() for g in g_vt if g is not None])
        out.append(torch.nn.functional.cosine_similarity(flat_va, flat_vt, dim=0, eps=1e-12))
    return torch.stack(out)


def one_seed(cfg: VattConfig, every: int, progress: Progress | None = None) -> dict:
    """Plain training on ``cfg``'s corpus; every ``every`` steps, each target's score for the batch's triplets."""
    torch.manual_seed(cfg.synthetic.seed)
    data = DataStream(cfg.data, decoder=TripletDecoder(cfg.model), transform=to_tensors, rank=0, world_size=1)
    total = cfg.epochs * len(data)
    model = VattModel(cfg.model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.999), eps=1e-7, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg, total))
    params = shared_block_parameters(model)
    records: list[dict] = []
    task = progress.add_task(f"seed {cfg.synthetic.seed}", total=total) if progress else None
    step = 0
    model.train()
    while data.epoch < cfg.epochs:
        for batch in data:
            emb = model(batch["video"], batch["audio"], batch["text"])
            l_va = symmetric_nce(bag(emb.video_va), bag(emb.audio_va), cfg.model.temperature)
            l_vt = symmetric_nce(bag(emb.video_vat), bag(emb.text_vat), cfg.model.temperature)
            if step % every == 0:
                score = {"loss": (l_va + l_vt).detach()}
                for name, target in (("pooled", "pooled"), ("tokens", "last_block")):
                    score[name] = -cosine_rows(*per_sample_gradients(emb, cfg.model.temperature, target)).detach()
                score["params"] = -param_cosines(emb, cfg.model.temperature, params).detach()
                third = THIRDS[min(3 * step // total, 2)]
                for i, flag in enumerate(batch["misaligned"].tolist()):
                    records.append({"third": third, "misaligned": flag, **{k: float(v[i]) for k, v in score.items()}})
            loss = (l_va.mean() + l_vt.mean()) / 2
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            step += 1
            if progress:
                progress.update(task, advance=1)
    result = {"seed": cfg.synthetic.seed, "steps": total, "measured_triplets": len(records)}
    for third in (*THIRDS, "all"):
        rows = [r for r in records if third in ("all", r["third"])]
        flags = np.array([r["misaligned"] for r in rows])
        for name in TARGETS:
            result[f"{name}_{third}"] = auroc(np.array([r[name] for r in rows]), flags)
    return result


def plot(rows: list[dict], path: str) -> None:
    """Each score's AUROC per third of training (mean, sd over seeds as bars), chance at 0.5."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    x = np.arange(len(THIRDS))
    for k, name in enumerate(TARGETS):
        values = np.array([[r[f"{name}_{t}"] for t in THIRDS] for r in rows])
        ax.errorbar(x + (k - 1.5) * 0.06, values.mean(0), yerr=values.std(0, ddof=1) if len(rows) > 1 else None, marker="o", capsize=3,
                    label={"pooled": "cosine, pooled feature", "tokens": "cosine, last block's input", "params": "cosine, last block's parameters",
                           "loss": "per-triplet loss"}[name])
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xticks(x, [f"{t} third" for t in THIRDS])
    ax.set_ylabel("AUROC for misaligned triplets")
    ax.set_title(f"conflict scores in plain training ({len(rows)} seeds)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.vatt.conflict_targets", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--misaligned", type=float, default=0.3)
    parser.add_argument("--every", type=int, default=8, help="steps between measured batches")
    parser.add_argument("--out", default=None, help="folder for the corpora and conflict_targets.json (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 160)
    base = load_config(VattConfig, args.config, args.overrides)
    root = args.out or tempfile.mkdtemp(prefix="vatt-targets-")
    rows = []
    with Progress(console=console, transient=True) as progress:
        for seed in args.seeds:
            rows.append(one_seed(corpus(base, root, seed, args.misaligned), args.every, progress))
            console.print(json.dumps(rows[-1]))
    table = Table(title=f"AUROC for misaligned triplets ({args.misaligned:.0%} swapped, {len(rows)} seeds, mean ± sd)")
    table.add_column("score")
    for third in (*THIRDS, "all"):
        table.add_column(third)
    summary = {}
    for name in TARGETS:
        cells = []
        for third in (*THIRDS, "all"):
            values = [r[f"{name}_{third}"] for r in rows]
            mean, sd = statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
            summary[f"{name}_{third}"] = [mean, sd]
            cells.append(f"{mean:.3f} ± {sd:.3f}")
        table.add_row(name, *cells)
    console.print(table)
    for name in ("tokens", "params", "loss"):
        diffs = [r[f"{name}_all"] - r["pooled_all"] for r in rows]
        sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        summary[f"{name}_minus_pooled"] = [statistics.fmean(diffs), sd]
        console.print(f"{name} minus pooled (paired, all steps): {statistics.fmean(diffs):+.3f} ± {sd:.3f}")
    path = os.path.join(root, "conflict_targets.json")
    with open(path, "w") as f:
        json.dump({"rows": rows, "summary": summary, "argv": argv if argv is not None else sys.argv[1:]}, f, indent=1)
    plot(rows, os.path.join(root, "conflict_targets.png"))
    console.print(f"report: {path}")
    console.print(f"plot: {os.path.join(root, 'conflict_targets.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
