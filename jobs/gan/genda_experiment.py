"""GenDA vs plain fine-tuning from ONE target image (METHODS.md 4.3, 4.5): the target is a shape in a colour the
source corpus does not have (green; the corpus has red and blue). Each arm x seed x step budget adapts the source
run's generator and is scored on fixed latents, without truncation: the target-attribute rate (an exact colour
oracle: an object of 2-50% of the image whose pixels are green by hue), diversity (mean pairwise distance in the
FID_domain extractor's feature space, over all samples and over the green ones), distinct shapes (the domain
classifier's reading with colour removed) and the clear-shape share. The source generator (no adaptation) and the
real held-out images are the controls. Runs are deterministic: a generator already in ``<out>/out`` is rescored,
not retrained. Writes ``<out>/genda-experiment.json``, ``.md`` and ``.png``.

    OMP_NUM_THREADS=1 python -m jobs.gan.genda_experiment --config jobs/gan/configs/genda-tiny.yaml --source <checkpoint dir> --out <folder>
"""

from __future__ import annotations

import functools
import json
import os
import time

import numpy as np
import torch
from PIL import Image
from torch import nn

from jobs.gan import evaluate
from jobs.gan.config import GANConfig
from jobs.gan.genda import AdaptedGenerator, Adaptor, load_adapted, load_source, prepare_genda, read_target, train

GREEN = (80, 220, 80)  # the new attribute: the source corpus has red (255, 80, 80) and blue (80, 160, 255) shapes
RED = (255, 80, 80)


def render_target(shape: str, size: int, colour: tuple[int, int, int] = GREEN) -> np.ndarray:
    """One (size, size, 3) uint8 shape as the corpus draws them (centred, radius 0.26 size), in ``colour``."""
    from jobs.gan.data import _shape_mask

    image = np.full((size, size, 3), 30.0)
    image[_shape_mask(shape, size, size / 2, size / 2, 0.26 * size)] = np.array(colour) * 0.92
    image += np.random.default_rng(0).normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def shape_mask(images: torch.Tensor, threshold: int = 100) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> (N, H, W): the shape's pixels (any channel above ``threshold``; the corpus'
    background is 20-40, its shapes' brightest channel 217-255)."""
    return images.max(1).values > threshold


COLOURS = ("red", "green", "blue", "none")


def object_colour(images: torch.Tensor, *, hue_ratio: float = 1.4, min_area: float = 0.02, max_area: float = 0.5) -> torch.Tensor:
    """(N,) index into COLOURS: the colour of the object each uint8 image shows on a dark background. The
    bright pixels (``shape_mask``) must cover ``min_area`` to ``max_area`` of the image (the corpus' shapes
    cover 10-30%; a brightened background is not an object) and more than half of them be of that colour by
    hue: the channel at least ``hue_ratio`` times both others (red (255, 80, 80): 3.2, blue (80, 160, 255): 1.6,
    green (80, 220, 80): 2.75; a teal or grey pixel is none of them). 3 ('none'): no such object."""
    mask = shape_mask(images)
    x = images.float()
    area = mask.float().mean((1, 2))
    out = torch.full((len(images),), 3)
    for i in range(3):
        others = torch.stack([x[:, j] for j in range(3) if j != i]).amax(0)
        share = ((x[:, i] >= hue_ratio * others) & mask).sum((1, 2)) / mask.sum((1, 2)).clamp(min=1)
        out[(area >= min_area) & (area <= max_area) & (share > 0.5)] = i
    return out


def colour_shares(images: torch.Tensor) -> dict[str, float]:
    counts = torch.bincount(object_colour(images), minlength=len(COLOURS)).double() / len(images)
    return {name: float(c) for name, c in zip(COLOURS, counts)}


def diversity(features_NF: torch.Tensor) -> float:
    """Mean pairwise L2 distance of the images' extractor features (i != j)."""
    f = features_NF.double()
    d = torch.cdist(f, f)
    return float(d.sum() / (len(f) * (len(f) - 1)))


@torch.no_grad()
def colour_blind_shapes(classifier: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(N, 5) probabilities of the corpus' shapes, ignoring colour: each image's shape pixels are redrawn in red
    on the corpus' background and the domain classifier's mode (shape x colour) probabilities summed per shape."""
    mask = shape_mask(images)[:, None]
    recoloured = torch.where(mask, (torch.tensor(RED) * 0.92).round().to(torch.uint8)[None, :, None, None], torch.tensor(30, dtype=torch.uint8))
    probs = torch.cat([classifier.logits(chunk).softmax(1) for chunk in recoloured.split(250)])
    return probs.reshape(len(images), -1, 2).sum(2)  # mode m is shape m // 2


@torch.no_grad()
def scores(ext, images: torch.Tensor, target: torch.Tensor, *, min_share: float, threshold: float) -> dict:
    """The experiment's scores of uint8 ``images`` (N, 3, H, W) against the uint8 ``target`` (1, 3, H, W): the
    colours, diversity and shapes of all images, and diversity and shapes of those that show a green object."""
    colour = object_colour(images)
    shapes = colour_blind_shapes(ext.classifier, images)
    features = torch.cat([ext.features(chunk) for chunk in images.split(250)])

    def spread(keep: torch.Tensor) -> dict:
        if int(keep.sum()) < 10:
            return {"diversity": float("nan"), "distinct_shapes": float("nan")}
        hist = torch.bincount(shapes[keep].argmax(1), minlength=shapes.shape[1]).double() / int(keep.sum())
        return {"diversity": diversity(features[keep]), "distinct_shapes": int((hist >= min_share / len(hist)).sum()),
                "shape_histogram": [round(float(h), 4) for h in hist]}

    green = colour == COLOURS.index("green")
    return {"attribute_rate": float(green.double().mean()), "colours": colour_shares(images), **spread(torch.ones_like(green)),
            "on_target": spread(green), "clear_shape_share": float((shapes.max(1).values > threshold).double().mean()),
            "distance_to_target": float((features - ext.features(target)).norm(dim=1).mean())}


ARMS = {  # the experiment's arms: genda fields (the learning rates come from the command line)
    "adaptor": {"method": "adaptor", "truncation": 0.7},
    "adaptor-psi1": {"method": "adaptor", "truncation": 1.0},  # GenDA without its diversity constraint
    "finetune": {"method": "finetune", "truncation": 1.0},
}


def experiment(base: GANConfig, *, root: str, seeds: list[int], arms: dict[str, dict], steps: list[int], num_generated: int) -> dict:
    """Each arm (``arms``: name -> genda fields) x seed x step budget adapts ``base``'s source to ``genda.target``
    (Ray Train local mode, one process) and is scored on ``num_generated`` samples of fixed latents, no
    truncation; the source and real held-out images are the controls."""
    from labtrain.train import run

    images, labels = evaluate.load_heldout(base)
    ext = evaluate.extractor(base, images, labels)
    cpu, target = torch.device("cpu"), to_uint8_image(base.genda.target, base.images.resolution)
    score = functools.partial(scores, ext, target=target, min_share=base.eval.coverage_min_share, threshold=base.eval.quality_threshold)
    real, real_labels = images[len(images) // 2:][:num_generated], labels[len(images) // 2:][:num_generated]
    shape_oracle_accuracy = float((colour_blind_shapes(ext.classifier, real).argmax(1) == real_labels // 2).float().mean())
    controls = {"real held-out": score(real), "target image": colour_shares(target)}
    G_source, _ = load_source(base.model, base.images.resolution, base.genda.source)
    rows = [{"arm": "source (no adaptation)", "seed": None, "steps": 0, **score(evaluate.generate(AdaptedGenerator(G_source, Adaptor(G_source.w_dim)), num_generated, cpu))}]
    for seed in seeds:
        for arm, fields in arms.items():
            for num_steps in steps:
                name = f"genda-{arm}-s{seed}-{num_steps}"
                generator_path = os.path.join(root, "out", f"{name}-genda-generator.pt")
                cfg = base.model_copy(update={"seed": seed, "genda": base.genda.model_copy(update={**fields, "steps": num_steps}), "out_dir": os.path.join(root, "out"),
                                              "run": base.run.model_copy(update={"num_workers": 0, "name": name, "storage_path": os.path.join(root, "ckpt")})})
                started, wall_s = time.perf_counter(), None
                if os.path.exists(generator_path):  # an earlier run of the experiment in this folder: rescored (runs are deterministic)
                    print(f"reusing {generator_path}", flush=True)
                elif (result := run(train, cfg, cfg.run, kind="gan")).error is not None:
                    raise RuntimeError(f"run {name} failed: {result.error}")
                else:
                    wall_s = time.perf_counter() - started
                adapted = load_adapted(generator_path, base.model, base.images.resolution)
                rows.append({"arm": arm, "seed": seed, "steps": num_steps, **fields, "wall_s": wall_s,
                             **score(evaluate.generate(adapted, num_generated, cpu))})
                print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows, "controls": controls, "shape_oracle_accuracy_on_real": shape_oracle_accuracy, "metric_extractor": ext.name,
            "num_generated": num_generated, "target": base.genda.target}


def to_uint8_image(path: str, resolution: int) -> torch.Tensor:
    return ((read_target(path, resolution)[None] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def summarize(out: dict) -> str:
    """A markdown table: per arm and step budget, mean ± sd over seeds of each score (runs with under 10 green
    objects have no on-target figures: the count of runs that do is given)."""
    import math
    import statistics

    def cell(values: list[float], fmt: str) -> str:
        kept = [v for v in values if not math.isnan(v)]
        if not kept:
            return "-"
        text = f"{statistics.mean(kept):{fmt}} ± {statistics.stdev(kept):{fmt}}" if len(kept) > 1 else f"{kept[0]:{fmt}}"
        return text if len(kept) == len(values) else f"{text} ({len(kept)} runs)"

    lines = ["| arm | steps | seeds | target-attribute rate (green object) | red / blue / no such object | diversity, all samples | distinct shapes, all "
             "| diversity, green ones | distinct shapes, green ones | clear-shape share |", "|---|---|---|---|---|---|---|---|---|---|"]
    for arm, steps in dict.fromkeys((r["arm"], r["steps"]) for r in out["rows"]):
        rs = [r for r in out["rows"] if (r["arm"], r["steps"]) == (arm, steps)]
        rgbn = " / ".join(cell([r["colours"][c] for r in rs], ".2f") for c in ("red", "blue", "none"))
        lines.append(f"| {arm} | {steps} | {len(rs) if rs[0]['seed'] is not None else '-'} | {cell([r['attribute_rate'] for r in rs], '.3f')} | {rgbn} | "
                     f"{cell([r['diversity'] for r in rs], '.2f')} | {cell([float(r['distinct_shapes']) for r in rs], '.1f')} | "
                     f"{cell([r['on_target']['diversity'] for r in rs], '.2f')} | {cell([float(r['on_target']['distinct_shapes']) for r in rs], '.1f')} | "
                     f"{cell([r['clear_shape_share'] for r in rs], '.2f')} |")
    real = out["controls"]["real held-out"]
    lines.append(f"| real held-out images (control) | - | - | {real['attribute_rate']:.3f} | {real['colours']['red']:.2f} / {real['colours']['blue']:.2f} / "
                 f"{real['colours']['none']:.2f} | {real['diversity']:.2f} | {real['distinct_shapes']} | - | - | {real['clear_shape_share']:.2f} |")
    lines.append(f"\nN = {out['num_generated']} images per row (fixed latents, no truncation); features and shapes: {out['metric_extractor']}; "
                 f"the colour-blind shape reading is right on {out['shape_oracle_accuracy_on_real']:.3f} of real held-out images; "
                 f"the target image reads green: {out['controls']['target image']['green']:.0f}")
    return "\n".join(lines)


def plot(out: dict, path: str) -> None:
    """Diversity against the target-attribute rate, each arm's mean over seeds along its step budgets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for arm in dict.fromkeys(r["arm"] for r in out["rows"]):
        steps = sorted({r["steps"] for r in out["rows"] if r["arm"] == arm})
        xs = [np.nanmean([r["on_target"]["diversity"] for r in out["rows"] if (r["arm"], r["steps"]) == (arm, s)]) for s in steps]
        ys = [np.mean([r["attribute_rate"] for r in out["rows"] if (r["arm"], r["steps"]) == (arm, s)]) for s in steps]
        ax.plot(xs, ys, "o-", label=arm)
        for x, y, s in zip(xs, ys, steps):
            ax.annotate(str(s), (x, y), fontsize=6)
    ax.axvline(out["controls"]["real held-out"]["diversity"], color="k", ls="--", lw=1, label="real held-out diversity")
    ax.set(xlabel="diversity of the green samples (mean pairwise feature distance)", ylabel="target-attribute rate (green)", ylim=(-0.05, 1.05),
           title="GenDA vs fine-tuning on one image (labels: steps)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from labtrain import storage
    from labtrain.config import load_config

    parser = argparse.ArgumentParser(prog="python -m jobs.gan.genda_experiment", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--source", required=True, help="the source stylegan2 run's checkpoint folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=["adaptor", "adaptor-psi1", "finetune"], choices=list(ARMS))
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 100, 200, 400], help="step budgets (each a run of its own)")
    parser.add_argument("--adaptor-lr", type=float, default=0.01)
    parser.add_argument("--finetune-lr", type=float, default=0.002)
    parser.add_argument("--shape", default="disc", help="the target's shape (drawn green)")
    parser.add_argument("--num-generated", type=int, default=500)
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    target = os.path.join(os.path.abspath(args.out), f"target-green-{args.shape}.png")
    base = storage.resolve_paths(load_config(GANConfig, args.config, ["mode=genda", f"genda.source={args.source}", f"genda.target={target}", *args.overrides]))
    Image.fromarray(render_target(args.shape, base.images.resolution)).save(target)
    prepare_genda(base)
    arms = {arm: {**ARMS[arm], "lr": args.finetune_lr if arm == "finetune" else args.adaptor_lr} for arm in args.arms}
    out = experiment(base, root=os.path.abspath(args.out), seeds=args.seeds, arms=arms, steps=args.steps, num_generated=args.num_generated)
    md = summarize(out)
    print(md)
    stem = os.path.join(args.out, "genda-experiment")
    with open(stem + ".json", "w") as f:
        json.dump({**out, "config": base.model_dump(mode="json")}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(md + "\n")
    plot(out, stem + ".png")
    print(f"wrote {stem}.json, .md and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
