"""The data pipeline: raw text -> tokenizer -> ELECTRA examples -> tar shards of blocks + manifest ->
a partitioned stream (each rank reads only its share).

prepare(inputs, output, tokenizer, seq_len)        write shards (``electra-scale prepare``)
load_manifest(prefix).check_compatible(V, L)       what a run reads first
PretrainStream(prefix, manifest, ...)              per-step lists of MicroBatch, resumable by step
PretrainStream(load_sources(cfg.data.resolved_sources()), ...)   the same, mixing several shard sets by weight
"""

import importlib

from electra_scale.data.prepare import ExampleBuilder, prepare
from electra_scale.data.shards import DataError, Manifest, ShardInfo, load_manifest, read_block, read_shard
from electra_scale.data.tokenizer import (
    SPECIAL_TOKENS,
    load_tokenizer,
    save_tokenizer,
    special_ids,
    tokenizer_sha256,
)

# The stream is imported on first use (PEP 562): prepare's worker processes import data.prepare, and with it
# this package, and must not pay for torch (the stream's).
_WHERE = {name: "stream" for name in ("MicroBatch", "PretrainStream", "StreamLayout", "resolve_partitions")}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


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
