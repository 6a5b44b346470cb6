"""Queries to the global optimum on a NAS table: WeakNAS vs random search vs regularised evolution.

Each method searches the table (NAS-Bench-201 CIFAR-10 by default) from many seeds until it queries an
architecture with the table's best score, and the figure is the number of distinct architectures queried
by then (the optimum's own query included). Queries are answered from the table: the score a search sees
is the score we judge it by (NAS-Bench-201's table has one accuracy per cell). The searches are the job's
own (`jobs.nas.search`) with the job's defaults; `key=value` arguments override `SearchConfig` fields,
e.g. `weaknas.predictor.kind=gbt`. The last line of output is one JSON object.

    .venv/bin/python bench/nas.py [--quick] [--seeds N] [--table PATH] [--jobs N] [key.sub=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs.nas.config import SearchConfig  # noqa: E402
from jobs.nas.search import WeakNas, make_searcher  # noqa: E402
from jobs.nas.space import Nb201Space  # noqa: E402
from jobs.nas.table import Table, read_table  # noqa: E402
from labtrain.config import ConfigError, build_config, parse_overrides  # noqa: E402

# The lab's shared folder: $LABTRAIN_SHARED_DIR, else beside the checkout or one of its parents.
SHARED = Path(os.environ.get("LABTRAIN_SHARED_DIR") or next((p / "shared" for p in REPO.parents if (p / "shared" / "DESIGN.md").is_file()), REPO.parent / "shared"))
DEFAULT_TABLE = SHARED / "data" / "nas-bench-201" / "cifar10.csv"
METHODS = ("weaknas", "random", "evolution")

_table: Table | None = None


def _init_worker(table_path: str) -> None:
    global _table
    _table = read_table(table_path, Nb201Space())


def queries_to_best(method: str, seed: int, cfg: SearchConfig) -> dict:
    """Run one search until it queries a best-scoring architecture; how many queries it took."""
    table = _table
    space = Nb201Space()
    features = space.encode(table.choices_ND)
    searcher = make_searcher(method, table.choices_ND, features, seed, weaknas=cfg.weaknas, evolution=cfg.evolution)
    is_best = table.scores == table.scores.max()
    batch = 1 if method == "evolution" else cfg.weaknas.num_per_iteration  # REA is sequential
    num_queries = 0
    top1_found_at = None  # the paper's protocol: the optimum is found once it is queried or predicted top-1
    while True:
        proposals = searcher.propose(batch)
        if isinstance(searcher, WeakNas) and top1_found_at is None and searcher.best_predicted is not None and is_best[searcher.best_predicted]:
            top1_found_at = num_queries
        assert proposals, "the search stopped before querying the whole table"
        for p in proposals:
            num_queries += 1
            searcher.observe(p.index, float(table.scores[p.index]))
            if is_best[p.index]:
                return {"method": method, "seed": seed, "queries": num_queries, "top1_or_queried": min(num_queries, top1_found_at or num_queries)}


def summarise(results: list[dict], method: str) -> dict[str, float]:
    ordered = sorted((r for r in results if r["method"] == method), key=lambda r: r["seed"])
    queries = [r["queries"] for r in ordered]
    out = {
        f"{method}_mean_queries": round(statistics.fmean(queries), 1),
        f"{method}_median_queries": float(statistics.median(queries)),
        f"{method}_max_queries": max(queries),
        # standard error of the mean over seeds: how far another set of seeds may move the mean
        f"{method}_mean_queries_sem": round(statistics.stdev(queries) / len(queries) ** 0.5, 1) if len(queries) > 1 else None,
    }
    if method == "weaknas":
        paper = [r["top1_or_queried"] for r in ordered]
        out["weaknas_mean_queries_queried_or_top1"] = round(statistics.fmean(paper), 1)
    out[f"{method}_queries_per_seed"] = queries
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 seeds instead of 100 (about a minute on 2 cores)")
    parser.add_argument("--seeds", type=int, help="number of seeds (default 100, or 2 with --quick)")
    parser.add_argument("--first-seed", type=int, default=0, help="run seeds FIRST .. FIRST+SEEDS-1 (to extend an earlier run)")
    parser.add_argument("--table", default=str(DEFAULT_TABLE), help="CSV of (arch, test_accuracy) in the NAS-Bench-201 space")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="worker processes (seeds run in parallel)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of weaknas,random,evolution")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="SearchConfig overrides, e.g. weaknas.predictor.kind=gbt")
    args = parser.parse_args(argv)
    try:
        cfg = build_config(SearchConfig, parse_overrides(args.overrides))
        table = read_table(args.table, Nb201Space())
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    num_seeds = args.seeds or (2 if args.quick else 100)
    methods = [m for m in args.methods.split(",") if m]
    print(f"{len(table.archs)} architectures in {args.table}, best score {table.best_score} ({int((table.scores == table.best_score).sum())} with it)", flush=True)

    start = time.perf_counter()
    tasks = [(m, s) for m in methods for s in range(args.first_seed, args.first_seed + num_seeds)]
    with ProcessPoolExecutor(max_workers=args.jobs, initializer=_init_worker, initargs=(args.table,)) as pool:
        futures = [pool.submit(queries_to_best, m, s, cfg) for m, s in tasks]
        results = []
        for future in as_completed(futures):
            results.append(future.result())
            r = results[-1]
            print(f"{len(results)}/{len(tasks)}: {r['method']} seed {r['seed']} found the optimum at query {r['queries']} ({time.perf_counter() - start:.0f} s)", flush=True)
    figures: dict[str, object] = {}
    for method in methods:
        figures.update(summarise(results, method))
    weak = cfg.weaknas
    figures.update(
        seeds=num_seeds,
        first_seed=args.first_seed,
        table=str(args.table),
        table_size=len(table.archs),
        predictor=weak.predictor.model_dump(),
        weaknas_settings={"num_initial": weak.num_initial, "num_per_iteration": weak.num_per_iteration, "top_k": [weak.top_k_start, weak.top_k_end]},
        evolution_settings=cfg.evolution.model_dump(),
        seconds=round(time.perf_counter() - start, 1),
    )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
