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

Corrupt shards (``data.on_corrupt_shard=skip``): a shard that fails to read as a whole (truncated, a damaged
header; a DataError, never a network error, which storage retries) yields no samples, and the steps are filled
from the samples that follow. So the batches are cut from the stream *with skipped shards left out*: step ``s``
takes the good samples ``[s*GB, (s+1)*GB)`` in stream order, and the formula above applies to that index. The
verdict is a function of the shard's bytes, and every rank reads every shard in the same order, so all ranks
skip the same shards and agree on every step without talking to each other. Resuming needs one more number
than the step: where in the raw stream step ``s`` begins (``position(s)["stream_position"]``, saved in the
checkpoint); without skips it is ``s*GB``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from electra_scale import storage
from electra_scale.data.shards import DataError, Manifest, read_shard

log = logging.getLogger("electra_scale")


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
    """One worker item: the samples of one shard visit from the stream's start on, in stream order."""

    slot: int
    positions: np.ndarray  # [k] int64, raw stream positions
    ids: np.ndarray  # [k, seq_len], manifest dtype, padded
    lengths: np.ndarray  # [k] int64
    skipped: str = ""  # why the shard was skipped (on_corrupt_shard=skip); then there are no samples
    shard: str = ""  # its name in the manifest


@dataclass
class _Failure:
    """A data/storage error in a worker, carried to the main process so it re-raises it unchanged (torch's
    own re-raise wraps the message in a worker traceback)."""

    error: Exception


class _SlotDataset(IterableDataset):
    def __init__(
        self, urls: list[str], layout: StreamLayout, manifest: Manifest, first_position: int, on_corrupt_shard: str
    ):
        super().__init__()
        self.urls, self.layout, self.shard_infos = urls, layout, manifest.shards
        self.first_position, self.first_slot = first_position, layout.slot_of(first_position)
        self.seq_len, self.pad_id = manifest.seq_len, manifest.special_ids["pad"]
        self.dtype = np.dtype(manifest.dtype)
        self.on_corrupt_shard = on_corrupt_shard

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
        """Every sample of slot ``g`` from the first position on: each rank reads whole shards, since which
        samples are its own depends on whether earlier shards were skipped."""
        e, j, start = self.layout.slot(g)
        pos = start + np.arange(int(self.layout.sizes[j]), dtype=np.int64)
        pos = pos[pos >= self.first_position]
        ids = np.full((len(pos), self.seq_len), self.pad_id, dtype=self.dtype)
        lengths = np.zeros(len(pos), dtype=np.int64)
        url, info = self.urls[j], self.shard_infos[j]
        if len(pos) == 0:
            return _Slot(g, pos, ids, lengths, shard=info.name)
        try:
            samples = read_shard(url, expected_samples=info.samples, expected_bytes=info.bytes)
        except DataError as err:
            if self.on_corrupt_shard != "skip":
                raise
            empty = np.zeros(0, dtype=np.int64)
            return _Slot(g, empty, ids[:0], empty, skipped=str(err), shard=info.name)
        for row, q in enumerate(self.layout.sample_order(e, j)[pos - start]):
            sample = samples[q]
            if len(sample) > self.seq_len:
                raise DataError(f"shard {url} sample {q} has {len(sample)} tokens > seq_len {self.seq_len}")
            ids[row, : len(sample)] = sample
            lengths[row] = len(sample)
        return _Slot(g, pos, ids, lengths, shard=info.name)


class PretrainStream:
    """Yields, per optimizer step from ``start_step`` on (endlessly), this rank's ``grad_accum``
    micro-batches.

    ``on_corrupt_shard``: "error" (a corrupt shard raises its DataError) or "skip" (see the module docstring).
    ``resume_position``: ``position(start_step)`` as the interrupted run saved it; needed for an exact resume
    once a shard was skipped (without it the stream assumes none was). ``skipped_shards``: the name of every
    shard visit skipped so far (a corrupt shard is skipped again each epoch), including those before a resume.
    """

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
        on_corrupt_shard: str = "error",
        resume_position: dict | None = None,
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
        if on_corrupt_shard not in ("error", "skip"):
            raise ValueError(f"on_corrupt_shard={on_corrupt_shard!r}: choose error or skip")
        self.shards, self.manifest, self.seed = shards, manifest, seed
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.start_step = num_workers, start_step
        self.on_corrupt_shard = on_corrupt_shard
        self.grad_accum = global_batch_size // (micro_batch_size * world_size)
        self.layout = StreamLayout(manifest, seed)
        self.urls = [storage.join(shards, s.name) for s in manifest.shards]
        self.sep_id = manifest.special_ids["sep"]
        seen = start_step * global_batch_size
        resume = resume_position or {}
        if resume and int(resume["samples_seen"]) != seen:
            raise ValueError(
                f"resume_position is for sample {resume['samples_seen']} but step {start_step} x global batch "
                f"{global_batch_size} starts at {seen}"
            )
        self.start_position = int(resume.get("stream_position", seen))
        self.skipped_before = [str(name) for name in resume.get("skipped_shards", [])]
        self._cursor: _Cursor | None = None

    @property
    def skipped_shards(self) -> list[str]:
        return self._cursor.skipped_names() if self._cursor is not None else list(self.skipped_before)

    def position(self, step: int) -> dict:
        """Where the stream stands after ``step`` optimizer steps, for the trainer's saved state: samples
        trained on, the raw stream position step ``step`` starts at (its epoch and offset in the epoch), and
        the shard visits skipped before it. Under "skip" it may read ahead to find out (a skipped shard can lie
        between this rank's last sample and the step's start); under "error" nothing can be skipped from here
        on, so it is arithmetic, and a run's last checkpoint never depends on a shard it will not train on."""
        if self.on_corrupt_shard == "error":
            return self.describe(step, self.start_position + (step - self.start_step) * self.global_batch_size)
        if self._cursor is None:
            iter(self)
        return self._cursor.position(step)

    def describe(self, step: int, raw: int, skipped: list[str] | None = None) -> dict:
        epoch_size = self.layout.epoch_size
        return {
            "samples_seen": step * self.global_batch_size,
            "stream_position": raw,
            "epoch": raw // epoch_size,
            "offset_in_epoch": raw % epoch_size,
            "skipped_shards": list(self.skipped_before if skipped is None else skipped),
        }

    def rank_positions(self, step: int) -> np.ndarray:
        """The indices into the stream of good samples (= stream positions when nothing was skipped) that
        this rank consumes at ``step``, micro-batch after micro-batch."""
        m, w = self.micro_batch_size, self.world_size
        base = step * self.global_batch_size + self.rank * m
        return (base + np.arange(self.grad_accum)[:, None] * (w * m) + np.arange(m)[None, :]).reshape(-1)

    def __iter__(self) -> _Cursor:
        dataset = _SlotDataset(self.urls, self.layout, self.manifest, self.start_position, self.on_corrupt_shard)
        # The loader gets its own generator: by default it draws its workers' base seed from torch's global
        # RNG, which also drives dropout, and a resumed run would then see a shifted dropout stream.
        loader_rng = torch.Generator().manual_seed(self.seed)
        items = (
            iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers, generator=loader_rng))
            if self.num_workers > 0
            else iter(dataset)
        )
        self._cursor = _Cursor(self, items, dataset.first_slot)
        return self._cursor

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


class _Cursor:
    """The main process's side of one pass: numbers the good samples as slots arrive, keeps this rank's, and
    remembers where each step begins in the raw stream."""

    def __init__(self, stream: PretrainStream, items: Iterator[_Slot | _Failure], first_slot: int):
        self.s, self.items = stream, items
        self.next_slot = first_slot
        self.step = stream.start_step
        self.index = stream.start_step * stream.global_batch_size  # index of the next good sample
        self.starts: dict[int, int] = {}  # step -> raw position of its first sample
        self.skipped: list[tuple[int, str]] = [(-1, name) for name in stream.skipped_before]  # (slot, shard)
        self.warned: set[str] = set()  # shards this process has logged (once each)
        self.skips_in_a_row = 0
        seq_len, dtype = stream.manifest.seq_len, np.dtype(stream.manifest.dtype)
        self.pos = np.zeros(0, dtype=np.int64)  # this rank's samples not yet handed out
        self.idx = np.zeros(0, dtype=np.int64)
        self.ids = np.zeros((0, seq_len), dtype=dtype)
        self.lengths = np.zeros(0, dtype=np.int64)

    def __iter__(self) -> _Cursor:
        return self

    def __next__(self) -> list[MicroBatch]:
        s = self.s
        per_step = s.grad_accum * s.micro_batch_size
        while len(self.pos) < per_step:
            self._pull()
        if not np.array_equal(self.idx[:per_step], s.rank_positions(self.step)):
            raise RuntimeError(f"data stream out of order at step {self.step}")
        m = s.micro_batch_size
        out = [
            s._micro_batch(self.pos[k : k + m], self.ids[k : k + m], self.lengths[k : k + m])
            for k in range(0, per_step, m)
        ]
        self.pos, self.idx = self.pos[per_step:], self.idx[per_step:]
        self.ids, self.lengths = self.ids[per_step:], self.lengths[per_step:]
        self.step += 1
        self.starts = {k: v for k, v in self.starts.items() if k >= self.step}
        return out

    def _pull(self) -> None:
        item = next(self.items)
        if isinstance(item, _Failure):
            raise item.error
        if item.slot != self.next_slot:  # would mean the round-robin order assumption broke
            raise RuntimeError(f"data stream out of order: got slot {item.slot}, expected {self.next_slot}")
        self.next_slot += 1
        if item.skipped:
            self._skip(item)
            return
        self.skips_in_a_row = 0
        n, gb = len(item.positions), self.s.global_batch_size
        if n == 0:
            return
        idx = self.index + np.arange(n, dtype=np.int64)
        for step in range(-(-self.index // gb), (self.index + n - 1) // gb + 1):  # steps that begin in here
            self.starts[step] = int(item.positions[step * gb - self.index])
        mine = (idx // self.s.micro_batch_size) % self.s.world_size == self.s.rank
        self.pos = np.concatenate([self.pos, item.positions[mine]])
        self.idx = np.concatenate([self.idx, idx[mine]])
        self.ids = np.concatenate([self.ids, item.ids[mine]])
        self.lengths = np.concatenate([self.lengths, item.lengths[mine]])
        self.index += n

    def _skip(self, item: _Slot) -> None:
        self.skipped.append((item.slot, item.shard))
        self.skips_in_a_row += 1
        if self.skips_in_a_row >= self.s.layout.num_shards:  # nothing left to train on: fail, don't spin
            raise DataError(
                f"every shard of {self.s.shards} is corrupt ({self.skips_in_a_row} skipped in a row under "
                f"data.on_corrupt_shard=skip), last: {item.skipped}"
            )
        if item.shard not in self.warned:
            self.warned.add(item.shard)
            if self.s.rank == 0:  # every rank skips it alike; one line is enough
                log.warning(
                    "data.on_corrupt_shard=skip: leaving out %s in this and every later epoch (%d shard(s) "
                    "skipped so far): %s",
                    item.shard,
                    len({name for _, name in self.skipped}),
                    item.skipped,
                )

    def skipped_names(self) -> list[str]:
        return [name for _, name in self.skipped]

    def position(self, step: int) -> dict:
        if step < self.step and step not in self.starts:
            raise ValueError(f"the stream is past step {step}; ask for position(step) before taking more steps")
        while step not in self.starts:
            self._pull()
        raw = self.starts[step]
        slot = self.s.layout.slot_of(raw)
        return self.s.describe(step, raw, [name for g, name in self.skipped if g < slot])
