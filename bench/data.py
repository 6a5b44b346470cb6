"""Data-path throughput, measured side by side in one run; the last line is one JSON object.

- labtrain_vs_webdataset: samples/s of labtrain's DataStream over samples/s of a plain webdataset
  pipeline (WebDataset -> decode -> batch) on the same shards, decoder and batch size (goal >= 1.0).
- s3_vs_local: labtrain's samples/s reading the same shards from S3 (moto's server on loopback) over
  reading them from local disk (goal >= 0.9).

Runs alternate between the contenders and the best of each is kept, so both see the same machine state.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import webdataset as wds
from torch.utils.data import default_collate

from labtrain.config import DataConfig, S3Config
from labtrain.data import DataStream, ShardWriter, s3, webdataset_decoder


def samples(count: int, size: int):
    rng = np.random.default_rng(0)
    for i in range(count):
        yield {"__key__": f"s{i:07d}", "npy": rng.integers(0, 255, (3, size, size), dtype=np.uint8), "cls": i % 10}


def write(out: str, count: int, size: int, per_shard: int, s3_cfg: S3Config | None = None) -> str:
    with ShardWriter(out, max_samples=per_shard, s3=s3_cfg) as writer:
        for sample in samples(count, size):
            writer.write(sample)
    return writer.pattern


def rate_labtrain(pattern: str, batch: int, s3_cfg: S3Config | None = None) -> float:
    cfg = DataConfig(urls=pattern, batch_size=batch, s3=s3_cfg or S3Config())
    start = time.perf_counter()
    n = sum(len(b["cls"]) for b in DataStream(cfg, rank=0, world_size=1))
    return n / (time.perf_counter() - start)


def _collate(group):
    return default_collate([{k: v for k, v in s.items() if not k.startswith("__")} for s in group])


def rate_webdataset(pattern: str, batch: int) -> float:
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(pattern),
        wds.tarfile_to_samples(),
        wds.map(webdataset_decoder()),
        wds.batched(batch, collation_fn=_collate, partial=False),
    )
    start = time.perf_counter()
    n = sum(len(b["cls"]) for b in pipeline)
    return n / (time.perf_counter() - start)


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    return proc, endpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small data, few repeats (under a minute)")
    args = parser.parse_args()
    count, repeats = (4000, 3) if args.quick else (20000, 5)
    size, batch, per_shard = 32, 64, 1000

    proc, endpoint = start_moto()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = write(os.path.join(tmp, "shards"), count, size, per_shard)
            s3_cfg = S3Config(endpoint_url=endpoint)
            s3.filesystem(s3_cfg).mkdir("bench")
            remote = write("s3://bench/shards", count, size, per_shard, s3_cfg)
            best = {"labtrain": 0.0, "webdataset": 0.0, "s3": 0.0}
            for i in range(repeats):
                best["webdataset"] = max(best["webdataset"], rate_webdataset(local, batch))
                best["labtrain"] = max(best["labtrain"], rate_labtrain(local, batch))
                best["s3"] = max(best["s3"], rate_labtrain(remote, batch, s3_cfg))
                print(f"repeat {i + 1}/{repeats}: " + ", ".join(f"{k} {v:,.0f} samples/s" for k, v in best.items()), file=sys.stderr)
    finally:
        proc.terminate()
    shard_mb = size * size * 3 * per_shard / 2**20
    print(json.dumps({
        "samples": count, "sample_bytes": size * size * 3, "shard_mb": round(shard_mb, 1), "batch_size": batch,
        "webdataset_samples_per_s": round(best["webdataset"]), "labtrain_samples_per_s": round(best["labtrain"]),
        "labtrain_s3_samples_per_s": round(best["s3"]),
        "labtrain_vs_webdataset": round(best["labtrain"] / best["webdataset"], 3),
        "s3_vs_local": round(best["s3"] / best["labtrain"], 3),
    }))


if __name__ == "__main__":
    main()
