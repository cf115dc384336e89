"""The data pipeline: raw text -> tokenizer -> ELECTRA examples -> tar shards of blocks + manifest ->
a partitioned stream (each rank reads only its share).

prepare(inputs, output, tokenizer, seq_len)        write shards (``electra-scale prepare``)
load_manifest(prefix).check_compatible(V, L)       what a run reads first
PretrainStream(prefix, manifest, ...)              per-step lists of MicroBatch, resumable by step
PretrainStream(load_sources(cfg.data.resolved_sources()), ...)   the same, mixing several shard sets by weight
"""

from electra_scale.data.prepare import ExampleBuilder, prepare
from electra_scale.data.shards import DataError, Manifest, ShardInfo, load_manifest, read_block, read_shard
from electra_scale.data.stream import MicroBatch, PretrainStream, StreamLayout, resolve_partitions
from electra_scale.data.tokenizer import (
    SPECIAL_TOKENS,
    load_tokenizer,
    save_tokenizer,
    special_ids,
    tokenizer_sha256,
)

__all__ = [
    "SPECIAL_TOKENS",
    "DataError",
    "ExampleBuilder",
    "Manifest",
    "MicroBatch",
    "PretrainStream",
    "ShardInfo",
    "StreamLayout",
    "load_manifest",
    "load_tokenizer",
    "prepare",
    "read_block",
    "read_shard",
    "resolve_partitions",
    "save_tokenizer",
    "special_ids",
    "tokenizer_sha256",
]
