"""Streaming webdataset shards from local disks or S3: writer, index, stages, and the rank's stream.

Importing this package registers the s3:// opener with webdataset (see :mod:`labtrain.data.s3`), so
every process that reads labtrain data can open s3:// shards.
"""

from labtrain.data import s3
from labtrain.data.index import Shard, build_index, expand_urls, load_shards
from labtrain.data.stages import DataError, webdataset_decoder
from labtrain.data.stream import DataStream
from labtrain.data.synthetic import local_shards_missing, require_shards
from labtrain.data.writer import ShardWriter, write_shards

s3.register()

__all__ = [
    "DataError",
    "DataStream",
    "Shard",
    "ShardWriter",
    "build_index",
    "expand_urls",
    "load_shards",
    "local_shards_missing",
    "require_shards",
    "webdataset_decoder",
    "write_shards",
]
