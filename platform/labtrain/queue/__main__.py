"""``python -m labtrain.queue serve --host 127.0.0.1 --port 8000``; every flag also reads an env variable."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from labtrain.config import ConfigError, build_config
from labtrain.queue.spec import DEFAULT_JOB_PATTERN, Settings


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m labtrain.queue", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the queue service (API, web page, scheduler and dispatcher)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--db", default=env("LABTRAIN_QUEUE_DB", "labtrain-queue.db"), help="SQLite path or postgresql:// URL (LABTRAIN_QUEUE_DB)")
    s.add_argument("--ray-address", default=env("LABTRAIN_QUEUE_RAY_ADDRESS"), help="Ray job API, http://host:8265 (LABTRAIN_QUEUE_RAY_ADDRESS)")
    s.add_argument("--admin-token", default=env("LABTRAIN_QUEUE_ADMIN_TOKEN"), help="token of the built-in admin (LABTRAIN_QUEUE_ADMIN_TOKEN)")
    s.add_argument("--users-file", default=env("LABTRAIN_QUEUE_USERS_FILE"), help="YAML users file (LABTRAIN_QUEUE_USERS_FILE)")
    s.add_argument("--half-life-s", type=float, default=float(env("LABTRAIN_QUEUE_HALF_LIFE_S", 7 * 86400)), help="fair-share usage half-life")
    s.add_argument("--cycle-s", type=float, default=float(env("LABTRAIN_QUEUE_CYCLE_S", 0.5)), help="seconds between scheduling cycles")
    s.add_argument("--default-time-limit-s", type=float, default=float(env("LABTRAIN_QUEUE_DEFAULT_TIME_LIMIT_S", 7 * 86400)))
    s.add_argument("--job-pattern", default=env("LABTRAIN_QUEUE_JOB_PATTERN", DEFAULT_JOB_PATTERN), help="regex of job modules that may be submitted")
    s.add_argument("--job-cwd", default=env("LABTRAIN_QUEUE_JOB_CWD"), help="directory job entrypoints run in on the cluster")
    s.add_argument("--capacity", default=env("LABTRAIN_QUEUE_CAPACITY"), help='fixed capacity as JSON, e.g. {"CPU": 4, "GPU": 0}; default: read from Ray')
    s.add_argument("--no-preemption", action="store_true", help="never stop running jobs for higher-priority ones")
    s.add_argument("--done-dir", default=env("LABTRAIN_QUEUE_DONE_DIR"), help="where runs record that they completed: a directory or s3:// prefix that this service and the jobs' drivers both reach, or off (default: beside the SQLite db)")
    s.add_argument("--log-level", default=env("LABTRAIN_QUEUE_LOG_LEVEL", "info"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = build_config(Settings, {
            "db": args.db, "ray_address": args.ray_address, "admin_token": args.admin_token, "users_file": args.users_file,
            "half_life_s": args.half_life_s, "cycle_s": args.cycle_s, "default_time_limit_s": args.default_time_limit_s,
            "job_pattern": args.job_pattern, "job_cwd": args.job_cwd,
            "capacity": json.loads(args.capacity) if args.capacity else None, "preemption": not args.no_preemption, "done_dir": args.done_dir,
        })
        import uvicorn

        from labtrain.queue.api import create_app

        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
        app = create_app(settings)
    except (ConfigError, json.JSONDecodeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())
    return 0


if __name__ == "__main__":
    sys.exit(main())
