"""The pretraining stream: exact, resumable, and independent of world size and dataloader workers.

The stream is the endless concatenation of epochs 0, 1, 2, ... Epoch ``e`` visits the shards in the order
``default_rng([seed, e]).permutation(n_shards)`` and, inside shard ``j``, its samples in the order
``default_rng([seed, e, j]).permutation(samples_j)``. So every example has a stable identity, its global
*stream position* ``p`` (epoch ``p // N``, offset ``p % N``), which the objective uses to key its masking
randomness.

Optimizer step ``s`` consumes positions ``[s*GB, (s+1)*GB)``; micro-step ``k`` of rank ``r`` takes
``s*GB + k*W*m + r*m + [0, m)``. Hence a global batch's content does not depend on the world size ``W`` or the
micro-batch ``m`` (2 ranks x m == 1 rank x 2m == 1 rank x m x 2 accumulation steps), and resuming needs only
the step number.

Each rank reads every shard of the stream and keeps only its own positions. ELECTRA samples are ~1 KB, so
reading (S3 GETs ran at ~260M tokens/s on loopback) is negligible next to the model's compute; that is the
price of world-size independence, and it buys exact resume on any number of ranks.

Dataloader workers split the work by shard *slot* (one (epoch, shard) visit): worker ``w`` of ``nw`` handles
slots ``g0 + w, g0 + w + nw, ...`` and yields exactly one item per slot (possibly empty). torch's DataLoader
returns workers' items round-robin, so the main process receives slots in stream order whatever ``nw`` is.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from electra_scale import storage
from electra_scale.data.shards import DataError, Manifest, read_shard


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [m, seq_len] int64, padded with the pad id
    attention_mask: torch.Tensor  # [m, seq_len] int64, 1 for real tokens
    token_type_ids: torch.Tensor  # [m, seq_len] int64, 0 through the first [SEP], 1 after it, 0 on padding
    positions: torch.Tensor  # [m] int64, the global stream position of each example


class StreamLayout:
    """Where every stream position lives, computed from the manifest alone (no shard is read)."""

    def __init__(self, manifest: Manifest, seed: int):
        self.sizes = np.array([s.samples for s in manifest.shards], dtype=np.int64)
        self.num_shards = len(self.sizes)
        self.epoch_size = int(self.sizes.sum())
        self.seed = seed
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard order, start offset of each slot within the epoch) for epoch ``e``."""
        if self._cached is None or self._cached[0] != e:
            order = np.random.default_rng([self.seed, e]).permutation(self.num_shards)
            starts = np.concatenate([[0], np.cumsum(self.sizes[order])[:-1]])
            self._cached = (e, order, starts)
        return self._cached[1], self._cached[2]

    def slot(self, g: int) -> tuple[int, int, int]:
        """Global slot ``g`` (epoch * num_shards + i) -> (epoch, shard index, position of its start)."""
        e, i = divmod(g, self.num_shards)
        order, starts = self.epoch(e)
        return e, int(order[i]), e * self.epoch_size + int(starts[i])

    def slot_of(self, p: int) -> int:
        """The global slot holding stream position ``p``."""
        e, offset = divmod(p, self.epoch_size)
        _, starts = self.epoch(e)
        return e * self.num_shards + int(np.searchsorted(starts, offset, side="right")) - 1

    def sample_order(self, e: int, j: int) -> np.ndarray:
        return np.random.default_rng([self.seed, e, j]).permutation(int(self.sizes[j]))


@dataclass
class _Slot:
    """One worker item: this rank's samples of one shard visit, in stream order."""

    slot: int
    positions: np.ndarray  # [k] int64
    ids: np.ndarray  # [k, seq_len], manifest dtype, padded
    lengths: np.ndarray  # [k] int64


@dataclass
class _Failure:
    """A data/storage error in a worker, carried to the main process so it re-raises it unchanged (torch's
    own re-raise wraps the message in a worker traceback)."""

    error: Exception


class _SlotDataset(IterableDataset):
    def __init__(
        self,
        urls: list[str],
        layout: StreamLayout,
        manifest: Manifest,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        first_position: int,
    ):
        super().__init__()
        self.urls, self.layout, self.shard_infos = urls, layout, manifest.shards
        self.rank, self.world_size, self.m = rank, world_size, micro_batch_size
        self.first_position = first_position
        self.first_slot = layout.slot_of(first_position)
        self.seq_len, self.pad_id = manifest.seq_len, manifest.special_ids["pad"]
        self.dtype = np.dtype(manifest.dtype)

    def __iter__(self) -> Iterator[_Slot | _Failure]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        if info is not None:
            # A forked worker must not share the parent's pooled S3 connections: build its own client.
            storage.s3_client.cache_clear()
        for g in itertools.count(self.first_slot + worker, num_workers):
            try:
                yield self.read_slot(g)
            except (DataError, storage.StorageError) as err:
                yield _Failure(err)
                return

    def read_slot(self, g: int) -> _Slot:
        e, j, start = self.layout.slot(g)
        size = int(self.layout.sizes[j])
        pos = start + np.arange(size, dtype=np.int64)
        keep = ((pos // self.m) % self.world_size == self.rank) & (pos >= self.first_position)
        pos = pos[keep]
        ids = np.full((len(pos), self.seq_len), self.pad_id, dtype=self.dtype)
        lengths = np.zeros(len(pos), dtype=np.int64)
        if len(pos) == 0:  # nothing of ours in this shard: skip reading it
            return _Slot(g, pos, ids, lengths)
        url, info = self.urls[j], self.shard_infos[j]
        samples = read_shard(url, expected_samples=info.samples, expected_bytes=info.bytes)
        for row, q in enumerate(self.layout.sample_order(e, j)[pos - start]):
            sample = samples[q]
            if len(sample) > self.seq_len:
                raise DataError(f"shard {url} sample {q} has {len(sample)} tokens > seq_len {self.seq_len}")
            ids[row, : len(sample)] = sample
            lengths[row] = len(sample)
        return _Slot(g, pos, ids, lengths)


class PretrainStream:
    """Yields, per optimizer step from ``start_step`` on (endlessly), this rank's ``grad_accum``
    micro-batches."""

    def __init__(
        self,
        shards: str,
        manifest: Manifest,
        *,
        seed: int,
        global_batch_size: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        num_workers: int = 2,
        start_step: int = 0,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if micro_batch_size < 1 or global_batch_size < 1:
            raise ValueError("global_batch_size and micro_batch_size must be positive")
        if global_batch_size % (micro_batch_size * world_size):
            raise ValueError(
                f"global_batch_size {global_batch_size} is not a multiple of micro_batch_size "
                f"{micro_batch_size} x world_size {world_size}; pick sizes so that the gradient "
                "accumulation steps are a whole number"
            )
        if num_workers < 0 or start_step < 0:
            raise ValueError("num_workers and start_step must be >= 0")
        self.shards, self.manifest, self.seed = shards, manifest, seed
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.start_step = num_workers, start_step
        self.grad_accum = global_batch_size // (micro_batch_size * world_size)
        self.layout = StreamLayout(manifest, seed)
        self.urls = [storage.join(shards, s.name) for s in manifest.shards]
        self.sep_id = manifest.special_ids["sep"]

    def position(self, step: int) -> dict:
        """The stream position reached after ``step`` optimizer steps, for the trainer's saved state."""
        seen = step * self.global_batch_size
        return {
            "samples_seen": seen,
            "epoch": seen // self.layout.epoch_size,
            "offset_in_epoch": seen % self.layout.epoch_size,
        }

    def rank_positions(self, step: int) -> np.ndarray:
        """The stream positions this rank consumes at ``step``, micro-batch after micro-batch."""
        m, w = self.micro_batch_size, self.world_size
        base = step * self.global_batch_size + self.rank * m
        return (base + np.arange(self.grad_accum)[:, None] * (w * m) + np.arange(m)[None, :]).reshape(-1)

    def __iter__(self) -> Iterator[list[MicroBatch]]:
        first = self.start_step * self.global_batch_size + self.rank * self.micro_batch_size
        dataset = _SlotDataset(
            self.urls, self.layout, self.manifest, self.rank, self.world_size, self.micro_batch_size, first
        )
        # The loader gets its own generator: by default it draws its workers' base seed from torch's global
        # RNG, which also drives dropout, and a resumed run would then see a shifted dropout stream.
        loader_rng = torch.Generator().manual_seed(self.seed)
        items = (
            iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers, generator=loader_rng))
            if self.num_workers > 0
            else iter(dataset)
        )
        per_step = self.grad_accum * self.micro_batch_size
        seq_len = self.manifest.seq_len
        pos = np.zeros(0, dtype=np.int64)
        ids = np.zeros((0, seq_len), dtype=np.dtype(self.manifest.dtype))
        lengths = np.zeros(0, dtype=np.int64)
        step, next_slot = self.start_step, dataset.first_slot
        for item in items:
            if isinstance(item, _Failure):
                raise item.error
            if item.slot != next_slot:  # would mean the round-robin order assumption broke
                raise RuntimeError(f"data stream out of order: got slot {item.slot}, expected {next_slot}")
            next_slot += 1
            if len(item.positions):
                pos = np.concatenate([pos, item.positions])
                ids = np.concatenate([ids, item.ids])
                lengths = np.concatenate([lengths, item.lengths])
            while len(pos) >= per_step:
                expected = self.rank_positions(step)
                if not np.array_equal(pos[:per_step], expected):
                    raise RuntimeError(f"data stream out of order at step {step}")
                yield [
                    self._micro_batch(
                        pos[k : k + self.micro_batch_size],
                        ids[k : k + self.micro_batch_size],
                        lengths[k : k + self.micro_batch_size],
                    )
                    for k in range(0, per_step, self.micro_batch_size)
                ]
                pos, ids, lengths = pos[per_step:], ids[per_step:], lengths[per_step:]
                step += 1

    def _micro_batch(self, pos: np.ndarray, ids: np.ndarray, lengths: np.ndarray) -> MicroBatch:
        input_ids = torch.from_numpy(ids.astype(np.int64))
        mask = torch.arange(ids.shape[1])[None, :] < torch.from_numpy(lengths)[:, None]
        is_sep = input_ids == self.sep_id
        seps_before = torch.cumsum(is_sep, dim=1) - is_sep.long()  # [SEP]s strictly left of each token
        return MicroBatch(
            input_ids=input_ids,
            attention_mask=mask.long(),
            token_type_ids=((seps_before > 0) & mask).long(),
            positions=torch.from_numpy(pos.copy()),
        )
