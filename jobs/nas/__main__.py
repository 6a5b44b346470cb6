"""python -m jobs.nas --config jobs/nas/configs/<preset>.yaml [key.sub=value ...]

Neural architecture search on the Ray cluster (RAY_ADDRESS, the local cluster, or a fresh local Ray).
Run the same command again to continue a stopped search; SIGTERM or Ctrl-C stops it cleanly.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

from jobs.nas.config import NasConfig
from jobs.nas.model import SpaceError
from jobs.nas.run import StateError, prepare, run_search
from jobs.nas.table import TableError
from labtrain.config import ConfigError, load_config
from labtrain.launch import gang_overrides, job_arguments, mark_done

# The queue's gang as the search's trials: ``--workers`` concurrent trials with one worker's resources each
# (they run inside the gang the queue reserved); ``--name`` names the search.
NAS_GANG = {"workers": "trials.max_concurrent", "cpus_per_worker": "trials.cpus_per_trial", "gpus_per_worker": "trials.gpus_per_trial",
            "memory_gb_per_worker": "trials.resources_per_trial", "name": "name"}


def main(argv: list[str] | None = None) -> int:
    args = job_arguments("python -m jobs.nas", __doc__).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(NasConfig, args.config, gang_overrides(args, NAS_GANG))
        if args.check:
            print(f"ok: NasConfig from {args.config} is valid", flush=True)
            return 0
        prep = prepare(cfg)  # the table, the space and any saved state are checked before a trial starts
    except (ConfigError, TableError, SpaceError, StateError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    complete, history = run_search(prep, stop=stop)
    for method, summary in history["methods"].items():
        best = summary["best"] or {}
        print(f"{method}: {summary['num_done']} done, {summary['num_failed']} failed, best {best.get('score')} {best.get('arch', '')}")
    out = prep.out_dir
    print(f"outputs: {out}/history.json, {out}/best.json, {out}/best_so_far.png")
    if not complete:
        print("stopped before the budget was used; run the same command again to continue", file=sys.stderr)
        return 1
    mark_done(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
