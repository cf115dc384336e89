"""The held-out set a run evaluates on (``eval.*``): the first ``examples`` examples of a shard set, in prepare's
order, as this rank's micro-batches. Read once when the run starts and kept: the same examples every time.

Each rank takes one contiguous share of the set (``np.array_split``) and fetches only the blocks that hold it, so
a rank reads ~1/W of the set. Every rank gets the same number of micro-batches: under ZeRO-3 each forward pass
gathers the parameters with a collective, which all ranks must join. The micro-batches hold about
``micro_batch_size`` examples each (one more at most, when the shares do not divide evenly).

An example's key for the evaluation's masks and samples is its index in the set: the same masks whatever the
world size or micro-batch size.
"""

from __future__ import annotations

import numpy as np
import torch

from electra_scale.data.shards import DataError, Manifest, load_manifest, read_block
from electra_scale.data.stream import MicroBatch


def load_eval_manifest(prefix: str, train: Manifest) -> Manifest:
    """The held-out set's manifest, refused in one line unless the model can read it as it reads the training
    shards: the same tokenizer (so the same ids) and seq_len."""
    manifest = load_manifest(prefix)
    if manifest.tokenizer_sha256 != train.tokenizer_sha256 or manifest.vocab_size != train.vocab_size:
        raise DataError(
            f"eval.shards={prefix} was tokenized with another tokenizer than data.shards={train.prefix} (tokenizer "
            f"sha256 {manifest.tokenizer_sha256[:12]} vs {train.tokenizer_sha256[:12]}); prepare it with the "
            f"training tokenizer (--tokenizer {train.prefix}/tokenizer.json) or with prepare --eval-fraction"
        )
    if manifest.seq_len != train.seq_len:
        raise DataError(
            f"eval.shards={prefix} holds examples of seq_len {manifest.seq_len}, the training shards "
            f"{train.seq_len}; prepare it again with --seq-len {train.seq_len}"
        )
    return manifest


def eval_micro_batches(
    prefix: str, manifest: Manifest, examples: int, rank: int, world_size: int, micro_batch_size: int
) -> tuple[list[MicroBatch], int]:
    """This rank's micro-batches of the first ``examples`` examples of the set (all of them if it has fewer),
    and how many examples the evaluation covers on all ranks together."""
    n = min(examples, manifest.num_samples)
    if n < world_size:
        raise DataError(
            f"eval.examples={examples} with an eval set of {manifest.num_samples} examples gives fewer than one "
            f"example per rank ({world_size} ranks); raise eval.examples or hold out more documents"
        )
    mine = np.array_split(np.arange(n), world_size)[rank]
    tokens, lengths = _read_examples(prefix, manifest, int(mine[0]), int(mine[-1]) + 1)
    # As many micro-batches on every rank: the smallest share, cut into pieces of about micro_batch_size.
    count = -(-(n // world_size) // micro_batch_size)
    specials = [manifest.special_ids[k] for k in ("cls", "sep", "mask", "pad")]
    batches = []
    for part in np.array_split(np.arange(len(mine)), count):
        batches.append(_micro_batch(tokens[part], lengths[part], mine[part], manifest.special_ids["sep"], specials))
    return batches, n


def _read_examples(prefix: str, manifest: Manifest, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Examples [lo, hi) of the set, padded to seq_len: only the blocks that hold them are fetched."""
    table = manifest.block_table()
    ids = np.full((hi - lo, manifest.seq_len), manifest.special_ids["pad"], dtype=manifest.dtype)
    lengths = np.zeros(hi - lo, dtype=np.int64)
    first_block = int(np.searchsorted(table.first, lo, side="right")) - 1
    block_of_shard = [(s, b) for s, shard in enumerate(manifest.shards) for b in shard.blocks]
    for k in range(first_block, len(table)):
        start = int(table.first[k])
        if start >= hi:
            break
        shard, info = block_of_shard[k]
        flat, block_lengths = read_block(prefix, manifest, shard, info)
        offsets = np.concatenate([[0], np.cumsum(block_lengths, dtype=np.int64)])
        for j in range(max(lo, start), min(hi, start + len(block_lengths))):
            i = j - start
            ids[j - lo, : block_lengths[i]] = flat[offsets[i] : offsets[i + 1]]
            lengths[j - lo] = block_lengths[i]
    return ids, lengths


def _micro_batch(ids: np.ndarray, lengths: np.ndarray, index: np.ndarray, sep: int, specials: list[int]) -> MicroBatch:
    """A data/stream.py ``MicroBatch`` of padded examples: where each one's first [SEP] is and how many of its
    tokens may be masked, as the stream computes them."""
    real = np.arange(ids.shape[1])[None, :] < lengths[:, None]
    is_sep = (ids == sep) & real
    first_sep = np.where(is_sep.any(1), is_sep.argmax(1), ids.shape[1])
    maskable = real & ~np.isin(ids, specials)
    index = torch.from_numpy(index.astype(np.int64))
    return MicroBatch(
        tokens=torch.from_numpy(ids),
        lengths=torch.from_numpy(lengths),
        first_sep=torch.from_numpy(first_sep.astype(np.int64)),
        candidates=torch.from_numpy(maskable.sum(1).astype(np.int64)),
        positions=index,
        samples=index.clone(),
    )
