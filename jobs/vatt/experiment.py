"""Can the corpus show what harmonization is for, and does harmonization recover it?

For each seed and each share of corrupted pairs (texts and audio swapped apart, ``synthetic.misaligned``), train
VATT through the real training function in every arm, on the same clips:
- ``clean``: the same clips with nothing swapped (oracle data; at 0% it is ``plain``, not run twice);
- ``perfect``: the perfect curriculum, dropping exactly the planted swapped pairs (at 0% it drops nothing: not run);
- ``plain``; ``realign`` (realignment only); ``curriculum`` (the conflict-score curriculum only); ``both``;
- ``random``: drops the same number of pairs on the same schedule as ``curriculum``, drawn at random;
- ``loss``: drops the same number by the per-pair loss;
- ``curriculum_lb`` and ``both_lb``: as ``curriculum`` and ``both`` with the per-sample gradients taken w.r.t. the
  video tokens entering the shared backbone's last block (``harmonize.target=last_block``).
At 0% only ``--zero-arms`` run (the question there is whether harmonization costs anything on clean data).
Headline figures come from the clean held-out split: text-to-video group R@1 and mAP (a hit is a clip of the
text's class and style), audio-to-video group R@1, class R@1, class and style probes; and from training: the
conflict score's and the loss's AUROC for misaligned triplets, and the curriculum's dropped-set precision
against the base rate. Paired differences against ``plain`` (same seed, same clips) give each arm's effect with
its spread over seeds. Runs use Ray Train's local mode (``run.num_workers=0``), ``--jobs`` at a time. Each run
finished is added to ``<out>/experiment.json`` at once; a later command into the same ``--out`` with the same config
reuses the runs there (to add arms, seeds or shares, or to go on after a stop), and refuses another config.

    python -m jobs.vatt.experiment --config jobs/vatt/configs/tiny.yaml --seeds 0 1 2 3 4 --jobs 2 [key=value ...]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import statistics
import sys
import tempfile

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from jobs.vatt.__main__ import prepare
from jobs.vatt.config import VattConfig
from jobs.vatt.evaluate import jsonable
from labtrain.config import load_config

console = Console(width=None if sys.stdout.isatty() else 220)  # the wide tables stay readable in a log file
ARMS = {
    "clean": {"realign": False, "curriculum": "none"},
    "perfect": {"realign": False, "curriculum": "share", "score": "oracle"},
    "plain": {"realign": False, "curriculum": "none"},
    "realign": {"realign": True, "curriculum": "none"},
    "curriculum": {"realign": False, "curriculum": "share", "score": "cosine"},
    "both": {"realign": True, "curriculum": "share", "score": "cosine"},
    "random": {"realign": False, "curriculum": "share", "score": "random"},
    "loss": {"realign": False, "curriculum": "share", "score": "loss"},
    "curriculum_lb": {"realign": False, "curriculum": "share", "score": "cosine", "target": "last_block"},
    "both_lb": {"realign": True, "curriculum": "share", "score": "cosine", "target": "last_block"},
}
ONLY_CORRUPTED = ("clean", "perfect")
HARMONIZED = ("both", "curriculum", "realign", "both_lb", "curriculum_lb")  # at 0% these are plain
METRICS = ("t2v_group_r1", "t2v_group_map", "a2v_group_r1", "t2v_class_r1", "class_probe_accuracy", "style_probe_accuracy",
           "conflict_auroc", "loss_auroc", "drop_precision", "drop_base_rate")
HEADLINE = "t2v_group_r1"


def corpus(base: VattConfig, root: str, seed: int, misaligned: float) -> VattConfig:
    """``base`` with its own synthetic corpus (written once, shared by the arms)."""
    data_dir = os.path.join(root, f"data-s{seed}-m{round(misaligned * 100)}")
    cfg = base.model_copy(update={
        "synthetic": base.synthetic.model_copy(update={"seed": seed, "misaligned": misaligned, "write": True}),  # this command writes its corpora
        "data": base.data.model_copy(update={"urls": os.path.join(data_dir, "train", os.path.basename(base.data.urls))}),
        "eval": base.eval.model_copy(update={"urls": os.path.join(data_dir, "eval", os.path.basename(base.eval.urls))}),
        "run": base.run.model_copy(update={"num_workers": 0, "storage_path": os.path.join(root, "ckpt")}),
        "out_dir": os.path.join(root, "out"),
        "log_every": 1,  # measure the conflict score on every step, in every arm
    })
    return prepare(cfg)


def arm_config(cfg: VattConfig, arm: str, misaligned: float) -> VattConfig:
    name = f"exp-s{cfg.synthetic.seed}-m{round(misaligned * 100)}-{arm}"
    return cfg.model_copy(update={
        "harmonize": cfg.harmonize.model_copy(update=ARMS[arm]),
        "run": cfg.run.model_copy(update={"name": name}),
    })


def one_run(cfg_json: dict, arm: str, misaligned: float, threads: int) -> dict:
    """One arm, in a worker process (its own Ray Train local-mode run)."""
    import torch

    from jobs.vatt.train import train
    from labtrain.train import run

    torch.set_num_threads(threads)
    cfg = VattConfig.model_validate(cfg_json)
    result = run(train, cfg, cfg.run, kind="vatt")
    if result.error is not None:
        raise RuntimeError(f"run {cfg.run.name} failed: {result.error}")
    m = result.metrics
    extra = ("t2v_group_r1_chance", "t2v_group_map_chance", "a2v_group_r1_chance", "dropped_share", "conflict_auroc_last_epoch")
    return {"seed": cfg.synthetic.seed, "misaligned": misaligned, "arm": arm, **{k: m.get(k, float("nan")) for k in METRICS + extra}}


def _mean_sd(values: list[float]) -> tuple[float, float, int]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan"), 0
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def summarize(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Per (share, arm): mean and sd over seeds; and paired differences of the headline metric against plain."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["misaligned"], row["arm"]), []).append(row)
    summary = []
    for (misaligned, arm), members in sorted(groups.items(), key=lambda kv: (kv[0][0], list(ARMS).index(kv[0][1]))):
        entry = {"misaligned": misaligned, "arm": arm, "seeds": len(members)}
        for key in METRICS + ("t2v_group_r1_chance", "t2v_group_map_chance", "dropped_share"):
            entry[key], entry[key + "_sd"], _ = _mean_sd([m[key] for m in members])
        summary.append(entry)
    plain = {(r["misaligned"], r["seed"]): r for r in rows if r["arm"] == "plain"}
    paired = []
    for (misaligned, arm), members in sorted(groups.items(), key=lambda kv: (kv[0][0], list(ARMS).index(kv[0][1]))):
        if arm == "plain":
            continue
        for key in (HEADLINE, "t2v_group_map", "a2v_group_r1"):
            diffs = [m[key] - plain[(misaligned, m["seed"])][key] for m in members if (misaligned, m["seed"]) in plain]
            mean, sd, n = _mean_sd(diffs)
            paired.append({"misaligned": misaligned, "arm": arm, "metric": key, "diff": mean, "sd": sd, "seeds": n})
    return summary, paired


def verdicts(rows: list[dict]) -> dict:
    """The issue's three questions, answered from paired runs (seeds where every needed arm ran)."""
    by = {(r["misaligned"], r["seed"], r["arm"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    out: dict = {}

    def paired(share: float, arm: str, against: str, key: str = HEADLINE) -> list[float]:
        return [by[(share, s, arm)][key] - by[(share, s, against)][key] for s in seeds if (share, s, arm) in by and (share, s, against) in by]

    for share in sorted({r["misaligned"] for r in rows if r["misaligned"] > 0}):
        gap = paired(share, "perfect", "plain")
        mean, sd, n = _mean_sd(gap)
        verdict = {"gap_perfect_minus_plain": mean, "gap_sd": sd, "seeds": n,
                   "a_corpus_can_test": bool(n >= 2 and mean >= 0.05 and mean >= 3 * sd)}
        for arm in ("both", "curriculum", "realign", "loss", "random", "both_lb", "curriculum_lb"):
            d = paired(share, arm, "plain")
            if d and abs(mean) > 1e-9:
                verdict[f"{arm}_recovered_share"] = _mean_sd(d)[0] / mean
        passing = []
        for arm in HARMONIZED:
            beats = paired(share, arm, "random")
            if beats:
                verdict[f"{arm}_minus_random"], verdict[f"{arm}_minus_random_sd"], _ = _mean_sd(beats)
                if verdict.get(f"{arm}_recovered_share", float("nan")) >= 0.3 and verdict[f"{arm}_minus_random"] > 0:
                    passing.append(arm)
        auroc = _mean_sd([by[(share, s, "both")]["conflict_auroc"] for s in seeds if (share, s, "both") in by])[0]
        precision = _mean_sd([by[(share, s, "both")]["drop_precision"] for s in seeds if (share, s, "both") in by])[0]
        base = _mean_sd([by[(share, s, "both")]["drop_base_rate"] for s in seeds if (share, s, "both") in by])[0]
        verdict.update(both_conflict_auroc=auroc, both_drop_precision=precision, drop_base_rate=base)
        verdict["b_arms_recovering_30pct_and_beating_random"] = passing
        verdict["b_harmonization_recovers"] = bool(verdict["a_corpus_can_test"] and passing)
        verdict["c_score_flags"] = bool(auroc >= 0.85 and precision >= 2 * base)
        out[f"{round(share * 100)}%"] = verdict
    zero = paired(0.0, "both", "plain")
    if zero:
        d, sd, n = _mean_sd(zero)
        plain_sd = _mean_sd([by[(0.0, s, "plain")][HEADLINE] for s in seeds if (0.0, s, "plain") in by])[1]
        out["0%"] = {"both_minus_plain": d, "sd": sd, "plain_sd": plain_sd, "within_1_sd_of_plain": bool(abs(d) <= plain_sd)}
    return out


def plot(summary: list[dict], paired: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = sorted({s["misaligned"] for s in summary})
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.2))
    present = [arm for arm in ARMS if any(s["arm"] == arm for s in summary)]  # the legend names only arms that ran
    colors = dict(zip(ARMS, plt.get_cmap("tab10").colors))  # one colour an arm, the same in every experiment
    width = 0.8 / len(present)
    for i, arm in enumerate(present):
        xs, ys, es = [], [], []
        for j, share in enumerate(shares):
            match = [s for s in summary if s["misaligned"] == share and s["arm"] == arm]
            if match:
                xs.append(j + i * width), ys.append(match[0][HEADLINE]), es.append(match[0][HEADLINE + "_sd"])
        axes[0].bar(xs, ys, width, yerr=es, label=arm, color=colors[arm])
    chance = statistics.mean(s["t2v_group_r1_chance"] for s in summary)
    axes[0].axhline(chance, color="k", ls="--", lw=0.8, label=f"chance {chance:.3f}")
    axes[0].set(title="text-to-video group R@1 (clean split; ceiling 1.0)", xticks=[j + 0.4 - width / 2 for j in range(len(shares))], xticklabels=[f"{s:.0%} swapped" for s in shares])
    axes[0].set_ylim(0, 1.0)
    axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    rows = [p for p in paired if p["metric"] == HEADLINE and p["misaligned"] > 0]
    labels = [f"{p['misaligned']:.0%} {p['arm']}" for p in rows]
    axes[1].barh(labels, [p["diff"] for p in rows], xerr=[p["sd"] for p in rows], color=[colors[p["arm"]] for p in rows])
    axes[1].axvline(0, color="k", lw=0.8)
    axes[1].set(title="paired difference vs plain, group R@1 (mean ± sd over seeds)")
    for arm in ("both", "plain", "loss"):
        match = [s for s in summary if s["arm"] == arm and s["misaligned"] > 0]
        axes[2].errorbar([s["misaligned"] for s in match], [s["conflict_auroc"] for s in match], yerr=[s["conflict_auroc_sd"] for s in match], marker="o", color=colors[arm], label=f"conflict score ({arm} runs)")
    match = [s for s in summary if s["arm"] == "plain" and s["misaligned"] > 0]
    axes[2].errorbar([s["misaligned"] for s in match], [s["loss_auroc"] for s in match], yerr=[s["loss_auroc_sd"] for s in match], marker="s", ls="--", color="k", label="loss (plain runs)")
    axes[2].axhline(0.85, color="tab:red", ls=":", lw=0.8, label="goal 0.85")
    axes[2].axhline(0.5, color="k", ls="--", lw=0.8)
    axes[2].set(title="AUROC for misaligned triplets", xlabel="share swapped", ylim=(0.3, 1.03))
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def earlier_runs(root: str, config: dict) -> list[dict]:
    """The runs an earlier command wrote into ``root`` with the same config (another config would resume their checkpoints)."""
    path = os.path.join(root, "experiment.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        earlier = json.load(f)
    if earlier.get("config") != config:
        changed = sorted(k for k in set(config) | set(earlier.get("config", {})) if config.get(k) != earlier.get("config", {}).get(k))
        raise SystemExit(f"error: {path} holds runs of another config (differs in {', '.join(changed)}); "
                         "its checkpoints would be resumed as this config's: choose another --out")
    return earlier["runs"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.vatt.experiment", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--misaligned", type=float, nargs="+", default=[0.0, 0.3, 0.5])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--zero-arms", nargs="+", choices=list(ARMS), default=["plain", "realign", "curriculum", "both"], help="the arms run at 0%%")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each gets cpus / jobs torch threads)")
    parser.add_argument("--out", default=None, help="output folder (default: a new temporary folder)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    base = load_config(VattConfig, args.config, args.overrides)
    root = args.out or tempfile.mkdtemp(prefix="vatt-experiment-")
    os.makedirs(root, exist_ok=True)
    config = json.loads(json.dumps(jsonable(base.model_dump(mode="json"))))
    rows = earlier_runs(root, config)
    done = {(r["seed"], r["misaligned"], r["arm"]) for r in rows}
    plan = []
    corpora: dict[tuple[int, float], VattConfig] = {}
    for seed in args.seeds:
        for share in args.misaligned:
            for key in ((seed, share), (seed, 0.0)):
                if key not in corpora and (key[1] == share or "clean" in args.arms):
                    corpora[key] = corpus(base, root, *key)
            cfg, clean = corpora[(seed, share)], corpora.get((seed, 0.0))
            for arm in args.arms:
                if share == 0 and (arm in ONLY_CORRUPTED or arm not in args.zero_arms):
                    continue
                source = clean if arm == "clean" else cfg
                if (seed, share, arm) in done:
                    continue
                plan.append((arm_config(source, arm, share).model_dump(mode="json"), arm, share))
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    if rows:
        console.print(f"reusing {len(rows)} runs of {root}/experiment.json; {len(plan)} to run")
    with Progress(console=console) as progress, concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        task = progress.add_task(f"{len(plan)} runs", total=len(plan))
        for row in pool.map(one_run, *zip(*plan), [threads] * len(plan)) if plan else ():
            rows.append(row)
            with open(os.path.join(root, "experiment.json"), "w") as f:  # so far: a stopped command goes on from here
                json.dump(jsonable({"runs": rows, "config": config}), f, indent=1, allow_nan=False)
            progress.advance(task)
            progress.console.print(f"seed {row['seed']} {row['misaligned']:.0%} {row['arm']}: group R@1 {row[HEADLINE]:.3f}, conflict AUROC {row['conflict_auroc']:.3f}")
    summary, paired = summarize(rows)
    table = Table(title="VATT harmonization experiment (mean ± sd over seeds; clean held-out split)")
    for col in ("swapped", "arm", "seeds", "t2v group R@1", "group mAP", "a2v group R@1", "class R@1", "class probe", "style probe", "conflict AUROC", "loss AUROC", "drop precision", "base rate"):
        table.add_column(col)
    for s in summary:
        table.add_row(f"{s['misaligned']:.0%}", s["arm"], str(s["seeds"]), *(f"{s[k]:.3f} ± {s[k + '_sd']:.3f}" for k in METRICS))
    console.print(table)
    table = Table(title="paired differences against plain (same seed, same clips): mean ± sd over seeds")
    for col in ("swapped", "arm", "t2v group R@1", "group mAP", "a2v group R@1"):
        table.add_column(col)
    for share, arm in dict.fromkeys((p["misaligned"], p["arm"]) for p in paired):
        cells = {p["metric"]: f"{p['diff']:+.3f} ± {p['sd']:.3f}" for p in paired if (p["misaligned"], p["arm"]) == (share, arm)}
        table.add_row(f"{share:.0%}", arm, cells.get(HEADLINE, ""), cells.get("t2v_group_map", ""), cells.get("a2v_group_r1", ""))
    console.print(table)
    answer = verdicts(rows)
    console.print_json(json.dumps(jsonable(answer)))
    with open(os.path.join(root, "experiment.json"), "w") as f:
        json.dump(jsonable({"runs": rows, "summary": summary, "paired": paired, "verdicts": answer, "config": config}), f, indent=1, allow_nan=False)
    plot(summary, paired, os.path.join(root, "experiment.png"))
    console.print(f"wrote {root}/experiment.json and experiment.png")
    print(json.dumps(jsonable({"verdicts": answer})))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
