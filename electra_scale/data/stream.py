"""The pretraining stream: each rank reads only its own share, and a run is the same run on any world size
that divides its partition count. The design, its figures and what it costs are in docs/data.md.

**Partitions.** A run fixes ``P`` partitions when it starts (``data.partitions``; saved in every checkpoint).
Epoch ``e`` puts every block of the set in the order ``default_rng([seed, e]).permutation(blocks)`` and reads
their examples end to end: a sequence of the ``N`` examples of the set. It is extended with its own first
``E - N`` examples up to ``E = P * Q``, ``Q = ceil(N / P)`` (fewer than ``P`` repeats per epoch), and cut into
``P`` spans of ``Q``: span ``p`` is partition ``p``'s share of the epoch, a run of randomly ordered blocks.

**The global order.** Stream position ``g`` (epoch ``g // E``) is the ``(i // P)``-th example of partition
``i % P``, where ``i = g % E``. Inside a span, examples are shuffled in *windows*: ``data.shuffle_blocks``
consecutive blocks of the span (clipped to it), permuted by ``default_rng([seed, e, p, k])``. So every global
batch takes its ``GB / P`` examples from each of the ``P`` partitions, i.e. from at least ``P`` different
random blocks of the corpus.

**Ranks.** Optimizer step ``s`` consumes positions ``[s*GB, (s+1)*GB)``; rank ``r`` of ``W`` takes the
positions ``g`` with ``g % W == r``, in order, cut into micro-batches of ``m``. Because ``W`` divides ``P``,
those are exactly the positions of the partitions ``p % W == r``: a rank fetches (one ranged GET per block)
and decodes only the blocks of its own ``P / W`` partitions, and the global batch does not depend on ``W``,
``m`` or the number of dataloader workers. Resuming needs only the step (and ``P``).

**Workers.** A rank's work items are the windows of its partitions, in the order in which training first
needs them. Dataloader worker ``w`` of ``nw`` reads items ``w, w + nw, ...`` and torch's DataLoader returns
them round-robin, so the main process receives them in that order whatever ``nw`` is, ``prefetch_factor``
items per worker ahead of the step that needs them.

**Several sources** (``data.sources``): each shard set has its own layout (the same ``P``, its own epochs and
shuffles), and lane ``p`` of the run's stream merges partition ``p`` of every source in the weights'
proportions (data/mix.py). Position ``g`` is still trained by rank ``g % W``, which reads only its own
partitions of each source; one source is exactly the stream above.

**Corrupt blocks** (``data.on_corrupt_shard=skip``): a block that fails its size, CRC-32 or structure check
is left out, and its examples' slots in the window are filled with other examples of the same window (drawn
by ``default_rng([seed, e, p, k, 1])``; from the partition's next good block if the whole window is bad).
Every rank still takes exactly its share of every step, so all ranks agree on every step without telling
each other anything, and no rank reads another's shards. The price: the filled slots repeat examples.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from electra_scale.config import source_name
from electra_scale.data.mix import LaneCursor, SourceMix
from electra_scale.data.shards import BlockInfo, BlockTable, DataError, Manifest, decode_block, load_manifest
from electra_scale.infra import storage

log = logging.getLogger("electra_scale")

AUTO_PARTITIONS = 64  # data.partitions' default: the largest W * 2^k up to this (at least W)
BLOCK_CACHE_BYTES = 64 << 20  # per worker: blocks shared by neighbouring windows are fetched once


@dataclass
class MicroBatch:
    """One micro-batch as the data path hands it over: the padded ids, in the shards' compact dtype, and a few
    numbers per example. The int64 ids, attention mask and token types all follow from these; ``model_inputs``
    builds them on the device the model runs on, so a GPU receives 2 bytes per token and three small vectors."""

    tokens: torch.Tensor  # [m, seq_len] uint16 (or int32 for vocabularies of 65536 and more), padded
    lengths: torch.Tensor  # [m] int64, real tokens of each example
    first_sep: torch.Tensor  # [m] int64, index of its first [SEP]: token type 0 up to it, 1 after it
    candidates: torch.Tensor  # [m] int64, tokens that may be masked (not [CLS], [SEP], [MASK] or [PAD])
    positions: torch.Tensor  # [m] int64, the global stream position of each example
    samples: torch.Tensor  # [m] int64, each example's index in its shard set (prepare's order)
    sources: torch.Tensor | None = None  # [m] int64, which of the run's sources it is from (data.sources' order)

    @staticmethod
    def _masks(tokens, lengths, first_sep) -> tuple[torch.Tensor, torch.Tensor]:
        cols = torch.arange(tokens.shape[1], device=tokens.device)[None, :]
        real = cols < lengths[:, None]
        return real.long(), ((cols > first_sep[:, None]) & real).long()

    @property
    def input_ids(self) -> torch.Tensor:
        return self.tokens.long()

    @property
    def attention_mask(self) -> torch.Tensor:
        return self._masks(self.tokens, self.lengths, self.first_sep)[0]

    @property
    def token_type_ids(self) -> torch.Tensor:
        return self._masks(self.tokens, self.lengths, self.first_sep)[1]

    def model_inputs(self, device: torch.device | str = "cpu", non_blocking: bool = False) -> dict:
        """The objective's keyword arguments, built on ``device``. ``padded`` is known here, on the host, so
        the encoders need not look at the mask to find out (a look that would make the host wait for the GPU)."""
        tokens = self.tokens.to(device, non_blocking=non_blocking)
        lengths = self.lengths.to(device, non_blocking=non_blocking)
        first_sep = self.first_sep.to(device, non_blocking=non_blocking)
        attention_mask, token_type_ids = self._masks(tokens, lengths, first_sep)
        return {
            "input_ids": tokens.long(),
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "positions": self.positions.to(device, non_blocking=non_blocking),
            "padded": bool((self.lengths < self.tokens.shape[1]).any()),
        }


def auto_partitions(world_size: int) -> int:
    p = world_size
    while p * 2 <= AUTO_PARTITIONS:
        p *= 2
    return p


def resolve_partitions(requested: int | None, world_size: int, num_samples: int, saved: int | None) -> int:
    """The run's partition count: the checkpoint's when resuming, else ``data.partitions`` or the default.
    A world size that does not divide it is refused naming the sizes that do."""
    if saved is not None:
        if requested and requested != saved:
            raise DataError(
                f"data.partitions={requested} but this run's stream was cut into {saved} partitions when it started "
                f"(saved in its checkpoint); drop the override or set data.partitions={saved}"
            )
        p = saved
    else:
        p = requested or auto_partitions(world_size)
    if p % world_size:
        valid = [w for w in range(1, p + 1) if p % w == 0]
        when = "when this run started (saved in its checkpoint)" if saved is not None else "by data.partitions"
        raise DataError(
            f"world size {world_size} does not divide the stream's {p} partitions, fixed {when}; "
            f"run on one of {', '.join(map(str, valid))} ranks"
            + ("" if saved is not None else f", or set data.partitions to a multiple of {world_size}")
        )
    if p > num_samples:
        raise DataError(f"data.partitions={p} is more than the shard set's {num_samples} examples; use fewer")
    return p


@dataclass(frozen=True)
class Window:
    """One work item: window ``k`` of partition ``p`` in epoch ``e``, with the blocks (and the example range
    ``[lo, hi)`` of each) it covers, and the span offsets ``[j0, j1)`` its examples take."""

    epoch: int
    partition: int
    index: int
    j0: int
    j1: int
    blocks: tuple[tuple[int, int, int], ...]  # (block id, lo, hi)


class StreamLayout:
    """Where every stream position lives, computed from the manifest, the seed and ``P`` alone. ``key``: what
    seeds its shuffles, ``(seed,)`` unless set; each source of a mix has its own, ``(seed, k)``."""

    def __init__(
        self, manifest: Manifest, seed: int, partitions: int, shuffle_blocks: int = 1, key: tuple[int, ...] = ()
    ):
        if partitions < 1 or partitions > manifest.num_samples:
            raise DataError(f"partitions={partitions} must be in [1, {manifest.num_samples}] (the set's examples)")
        if shuffle_blocks < 1:
            raise ValueError("shuffle_blocks must be >= 1")
        self.table: BlockTable = manifest.block_table()
        self.num_samples = manifest.num_samples
        self.partitions, self.seed, self.shuffle_blocks = partitions, seed, shuffle_blocks
        self.key = key or (seed,)
        self.span = -(-self.num_samples // partitions)  # Q
        self.epoch_size = self.span * partitions  # E
        self._orders: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._windows: dict[tuple[int, int], list[Window]] = {}
        self._starts: dict[tuple[int, int], np.ndarray] = {}

    def epoch_order(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(block ids, start of each in the epoch's sequence, with one more entry for the end) for epoch
        ``e``; the sequence runs on into its own first blocks to cover the ``E - N`` padding examples."""
        if e not in self._orders:
            order = np.random.default_rng([*self.key, e]).permutation(len(self.table))
            extra = self.epoch_size - self.num_samples
            if extra:
                head = np.cumsum(self.table.samples[order])
                order = np.concatenate([order, order[: int(np.searchsorted(head, extra)) + 1]])
            starts = np.concatenate([[0], np.cumsum(self.table.samples[order])]).astype(np.int64)
            self._orders[e] = (order, starts)
            while len(self._orders) > 2:
                self._orders.popitem(last=False)
                self._windows = {k: v for k, v in self._windows.items() if k[0] in self._orders}
                self._starts = {k: v for k, v in self._starts.items() if k[0] in self._orders}
        return self._orders[e]

    def windows(self, e: int, p: int) -> list[Window]:
        """Partition ``p``'s windows in epoch ``e``, in span order."""
        key = (e, p)
        if key not in self._windows:
            order, starts = self.epoch_order(e)
            lo, hi = p * self.span, (p + 1) * self.span
            first = int(np.searchsorted(starts, lo, side="right")) - 1
            last = int(np.searchsorted(starts, hi, side="left"))  # blocks [first, last) meet the span
            out = []
            for k, b0 in enumerate(range(first, last, self.shuffle_blocks)):
                b1 = min(b0 + self.shuffle_blocks, last)
                blocks = tuple(
                    (
                        int(order[b]),
                        max(lo, int(starts[b])) - int(starts[b]),
                        min(hi, int(starts[b + 1])) - int(starts[b]),
                    )
                    for b in range(b0, b1)
                )
                out.append(Window(e, p, k, max(lo, int(starts[b0])) - lo, min(hi, int(starts[b1])) - lo, blocks))
            self._windows[key] = out
        return self._windows[key]

    def window_starts(self, e: int, p: int) -> np.ndarray:
        key = (e, p)
        if key not in self._starts:
            self._starts[key] = np.array([w.j0 for w in self.windows(e, p)], dtype=np.int64)
        return self._starts[key]

    def first_position(self, w: Window) -> int:
        return w.epoch * self.epoch_size + w.j0 * self.partitions + w.partition

    def last_position(self, w: Window) -> int:
        return w.epoch * self.epoch_size + (w.j1 - 1) * self.partitions + w.partition

    def rank_windows(self, rank: int, world_size: int, first_positions: np.ndarray) -> Iterator[Window]:
        """A rank's work items, endlessly, in the order training first needs them, from ``first_positions[p]``
        on in each of its partitions ``p`` (one number for all: the partitions' positions from there)."""
        first = np.broadcast_to(np.asarray(first_positions, dtype=np.int64), (self.partitions,))
        for e in itertools.count(int(first[rank::world_size].min()) // self.epoch_size):
            mine = [w for p in range(rank, self.partitions, world_size) for w in self.windows(e, p)]
            mine.sort(key=self.first_position)
            yield from (w for w in mine if self.last_position(w) >= first[w.partition])

    def window_order(self, w: Window) -> np.ndarray:
        return np.random.default_rng([*self.key, w.epoch, w.partition, w.index]).permutation(w.j1 - w.j0)

    def lane_position(self, partitions: np.ndarray, index: np.ndarray) -> np.ndarray:
        """The stream position of example ``index`` of each partition (counted across epochs)."""
        e, j = np.divmod(index, self.span)
        return e * self.epoch_size + j * self.partitions + partitions

    def lane_index(self, w: Window) -> int:
        """The index, counted across epochs, of the window's last example in its partition."""
        return w.epoch * self.span + w.j1 - 1

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(epoch, partition, span offset) of each stream position."""
        e, i = np.divmod(positions, self.epoch_size)
        return e, i % self.partitions, i // self.partitions


@dataclass
class _Decoded:
    """A window's examples, padded, with a few numbers per example and the order to take them in."""

    window: Window
    ids: np.ndarray  # [n, seq_len] manifest dtype, in span order
    meta: np.ndarray  # [n, 4] int64: length, first [SEP], maskable tokens, index in the shard set
    order: np.ndarray  # [n] the window's shuffle: its r-th example is row order[r]
    skipped: list[str] = field(default_factory=list)  # "shard@byte: why" for each bad block left out


@dataclass
class _Failure:
    """A data/storage error in a worker, carried to the main process so it re-raises it unchanged (torch's
    own re-raise wraps the message in a worker traceback)."""

    error: Exception


class _WindowReader(IterableDataset):
    """Reads and decodes a rank's windows; in a worker process, every ``nw``-th of them."""

    def __init__(
        self,
        prefix: str,
        manifest: Manifest,
        layout: StreamLayout,
        rank: int,
        world_size: int,
        first_positions: np.ndarray,
        on_corrupt_shard: str,
    ):
        super().__init__()
        self.prefix, self.layout = prefix, layout
        self.rank, self.world_size, self.first_positions = rank, world_size, first_positions
        self.urls = [storage.join(prefix, s.name) for s in manifest.shards]
        self.seq_len, self.pad_id, self.dtype = manifest.seq_len, manifest.special_ids["pad"], manifest.dtype
        self.sep_id = manifest.special_ids["sep"]
        self.specials = [manifest.special_ids[k] for k in ("cls", "sep", "mask", "pad")]
        self.on_corrupt_shard = on_corrupt_shard
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray] | DataError] = OrderedDict()
        self._cached_bytes = 0

    def __iter__(self) -> Iterator[_Decoded | _Failure]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        if info is not None:
            # A forked worker must not share the parent's pooled S3 connections: build its own client.
            storage.reset_client()
        items = self.layout.rank_windows(self.rank, self.world_size, self.first_positions)
        for w in itertools.islice(items, worker, None, num_workers):
            try:
                yield self.read_window(w)
            except (DataError, storage.StorageError) as err:
                yield _Failure(err)
                return

    # ------------------------------------------------------------------------------------------ blocks
    def block(self, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | DataError:
        """(tokens, offsets, meta [k, 3]: length, first [SEP], maskable tokens) of block ``b``, or the DataError
        that says why it is unusable (under "skip"; under "error" it is raised)."""
        if b in self._cache:
            self._cache.move_to_end(b)
            return self._cache[b]
        t = self.layout.table
        url, start, length = self.urls[t.shard[b]], int(t.offset[b]), int(t.length[b])
        data = storage.read_range(url, start, start + length)
        try:
            tokens, lengths = decode_block(
                data, BlockInfo(start, length, int(t.samples[b]), int(t.crc32[b])), url, self.dtype, self.seq_len
            )
            value: tuple | DataError = self._describe(tokens, lengths)
        except DataError as err:
            if self.on_corrupt_shard != "skip":
                raise
            value = err
        self._cache[b] = value
        self._cached_bytes += length
        while self._cached_bytes > BLOCK_CACHE_BYTES and len(self._cache) > 1:
            old, _ = self._cache.popitem(last=False)
            self._cached_bytes -= int(t.length[old])
        return value

    def _describe(self, tokens: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per example, from the flat ids: where its first [SEP] is and how many tokens may be masked. Special
        tokens are a few per example, so this works on their positions, not on every token."""
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        k = len(lengths)
        is_special = tokens == self.specials[0]
        for sid in self.specials[1:]:
            is_special |= tokens == sid
        special = np.flatnonzero(is_special)
        owner = np.searchsorted(offsets, special, side="right") - 1
        seps = tokens[special] == self.sep_id
        first_sep = np.full(k, self.seq_len, dtype=np.int64)  # none: every token has type 0
        owners, first = np.unique(owner[seps], return_index=True)
        first_sep[owners] = special[seps][first] - offsets[owners]
        maskable = lengths.astype(np.int64) - np.bincount(owner, minlength=k)
        return tokens, offsets, np.stack([lengths.astype(np.int64), first_sep, maskable], 1)

    def read_window(self, w: Window) -> _Decoded:
        n = w.j1 - w.j0
        ids = np.full((n, self.seq_len), self.pad_id, dtype=self.dtype)
        meta = np.zeros((n, 4), dtype=np.int64)
        good = np.zeros(n, dtype=bool)
        skipped: list[str] = []
        row = 0
        for b, lo, hi in w.blocks:
            got = self.block(b)
            if isinstance(got, DataError):
                skipped.append(str(got))
            else:
                self._fill(ids, meta, row, got, lo, hi)
                meta[row : row + hi - lo, 3] = self.layout.table.first[b] + np.arange(lo, hi)
                good[row : row + hi - lo] = True
            row += hi - lo
        if skipped:
            self._fill_bad_slots(w, ids, meta, good)
        return _Decoded(w, ids, meta, self.layout.window_order(w), skipped)

    def _fill(self, ids: np.ndarray, meta: np.ndarray, row: int, block: tuple, lo: int, hi: int) -> None:
        tokens, offsets, block_meta = block
        lens = block_meta[lo:hi, 0]
        target = ids[row : row + hi - lo]
        target[np.arange(self.seq_len)[None, :] < lens[:, None]] = tokens[offsets[lo] : offsets[hi]]
        meta[row : row + hi - lo, :3] = block_meta[lo:hi]

    def _fill_bad_slots(self, w: Window, ids: np.ndarray, meta: np.ndarray, good: np.ndarray) -> None:
        """Slots of bad blocks take examples of the window's good blocks, or else of the partition's next good
        block (wrapping around the span): all drawn from this partition, so no other rank is involved."""
        rng = np.random.default_rng([*self.layout.key, w.epoch, w.partition, w.index, 1])
        bad = np.flatnonzero(~good)
        if good.any():
            src = rng.choice(np.flatnonzero(good), size=len(bad))
            ids[bad], meta[bad] = ids[src], meta[src]
            return
        windows = self.layout.windows(w.epoch, w.partition)
        last = ""
        for other in windows[w.index + 1 :] + windows[: w.index]:
            for b, lo, hi in other.blocks:
                got = self.block(b)
                if isinstance(got, DataError):
                    last = str(got)
                    continue
                tmp_ids = np.full((hi - lo, self.seq_len), self.pad_id, dtype=self.dtype)
                tmp_meta = np.zeros((hi - lo, 4), dtype=np.int64)
                self._fill(tmp_ids, tmp_meta, 0, got, lo, hi)
                tmp_meta[:, 3] = self.layout.table.first[b] + np.arange(lo, hi)
                src = rng.integers(0, hi - lo, size=len(bad))
                ids[bad], meta[bad] = tmp_ids[src], tmp_meta[src]
                return
        raise DataError(
            f"every block of partition {w.partition} in epoch {w.epoch} of {self.prefix} is corrupt, so under "
            f"data.on_corrupt_shard=skip there is nothing to train on in its place; last: {last or 'see above'}"
        )


class _RankTable:
    """Epoch ``e``'s windows of one rank, numbered partition by partition, for array lookups: which window
    holds span offset ``j`` of partition ``p``, and which pool slot holds that window (-1: not arrived)."""

    def __init__(self, layout: StreamLayout, e: int, rank: int, world_size: int):
        self.world_size = world_size
        per_partition = [layout.windows(e, p) for p in range(rank, layout.partitions, world_size)]
        self.offset = np.concatenate([[0], np.cumsum([len(ws) for ws in per_partition])]).astype(np.int64)
        self.stride = layout.span + 1
        self.key = np.array(
            [local * self.stride + w.j0 for local, ws in enumerate(per_partition) for w in ws], dtype=np.int64
        )
        self.j0 = np.array([w.j0 for ws in per_partition for w in ws], dtype=np.int64)
        self.slot = np.full(len(self.key), -1, dtype=np.int64)

    def wid(self, w: Window) -> int:
        return int(self.offset[w.partition // self.world_size]) + w.index

    def lookup(self, p: np.ndarray, j: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.key, (p // self.world_size) * self.stride + j, side="right") - 1


class _Pool:
    """The windows a rank has open, one slot each, in two arrays that grow by doubling."""

    def __init__(self, rows: int, seq_len: int, dtype: np.dtype, slots: int):
        self.ids = np.empty((slots, rows, seq_len), dtype=dtype)
        self.meta = np.empty((slots, rows, 4), dtype=np.int64)
        self.order = np.empty((slots, rows), dtype=np.int64)
        self.free = list(range(slots - 1, -1, -1))

    def put(self, d: _Decoded) -> int:
        if not self.free:
            old = len(self.ids)
            grow = max(4, old)
            self.ids = np.concatenate([self.ids, np.empty((grow, *self.ids.shape[1:]), self.ids.dtype)])
            self.meta = np.concatenate([self.meta, np.empty((grow, *self.meta.shape[1:]), self.meta.dtype)])
            self.order = np.concatenate([self.order, np.empty((grow, *self.order.shape[1:]), self.order.dtype)])
            self.free = list(range(old + grow - 1, old - 1, -1))
        slot = self.free.pop()
        self.ids[slot, : len(d.ids)] = d.ids
        self.meta[slot, : len(d.meta)] = d.meta
        self.order[slot, : len(d.order)] = d.order
        return slot

    def release(self, slot: int) -> None:
        self.free.append(slot)


@dataclass(frozen=True)
class Source:
    """One shard set of a run's data (``data.sources``, or ``data.shards`` as the only one, weight 1)."""

    name: str
    prefix: str
    manifest: Manifest
    weight: float = 1.0


def check_sources(sources: Sequence[Source]) -> None:
    """Every source of a mix must be read by the same model: the same tokenizer and the same seq_len. Refused
    in one line naming the sources that differ."""
    first = sources[0]
    for other in sources[1:]:
        a, b = first.manifest, other.manifest
        if a.tokenizer_sha256 != b.tokenizer_sha256 or a.vocab_size != b.vocab_size:
            raise DataError(
                f"data.sources {first.name!r} ({first.prefix}) and {other.name!r} ({other.prefix}) were tokenized "
                f"with different tokenizers (vocab {a.vocab_size}, sha256 {a.tokenizer_sha256[:12]} vs vocab "
                f"{b.vocab_size}, sha256 {b.tokenizer_sha256[:12]}); re-run prepare on one with --tokenizer "
                f"{storage.join(first.prefix, 'tokenizer.json')}"
            )
        if a.seq_len != b.seq_len:
            raise DataError(
                f"data.sources {first.name!r} ({first.prefix}) and {other.name!r} ({other.prefix}) were built with "
                f"seq_len {a.seq_len} and {b.seq_len}; re-run prepare on one with --seq-len {a.seq_len}"
            )


def load_sources(specs: Sequence) -> list[Source]:
    """The run's sources (config.SourceConfig: shards, weight, label) with their manifests, checked together."""
    sources = [Source(spec.label, spec.shards, load_manifest(spec.shards), spec.weight) for spec in specs]
    check_sources(sources)
    return sources


def check_same_mix(saved_position: dict, sources: Sequence[Source]) -> None:
    """A checkpoint continues only the mix it was trained on: the same sources, in the same order, with the same
    weights (else every later position would draw from elsewhere). Refused in one line before anything loads."""
    saved = saved_position.get("sources")
    now = [(s.name, s.weight) for s in sources]
    then = [(s["name"], s["weight"]) for s in saved] if saved else None
    if then is None and len(now) == 1:
        return  # one shard set then and now: the stream of data.shards
    same = then is not None and [n for n, _ in then] == [n for n, _ in now]
    if same:  # the same shares of the lattice: weights equal up to rounding (0.3 / 0.7 and 3 / 7 agree)
        same = SourceMix([w for _, w in then], 1, 0).bounds == SourceMix([w for _, w in now], 1, 0).bounds
    if not same:

        def describe(mix: list[tuple[str, float]] | None) -> str:
            return ", ".join(f"{n} (weight {w:g})" for n, w in mix) if mix else "one shard set (data.shards)"

        raise DataError(
            f"this run's checkpoint was trained on {describe(then)}, and the config now gives {describe(now)}; set "
            "data.sources back to continue the same data order, or start a new run (a new run.output_dir)"
        )


class _Feed:
    """One source's windows on one rank as they arrive, in one pool (a slot each), and the gather that cuts
    its examples of a step from them: array arithmetic, however many partitions the rank has."""

    def __init__(self, layout: StreamLayout, manifest: Manifest, items: Iterator, rank: int, world_size: int, note):
        self.layout, self.items, self.rank, self.world_size, self.note = layout, items, rank, world_size, note
        self.tables: dict[int, _RankTable] = {}
        rows_per_window = layout.shuffle_blocks * int(layout.table.samples.max())
        # About one open window per partition of this rank, two while one ends and the next begins.
        slots = 2 * (layout.partitions // world_size) + 2
        self.pool = _Pool(rows_per_window, manifest.seq_len, np.dtype(manifest.dtype), slots)
        self.expiry: list[tuple[int, int, int, int]] = []  # heap of (last lane index, epoch, window id, slot)

    def table(self, e: int) -> _RankTable:
        if e not in self.tables:
            self.tables[e] = _RankTable(self.layout, e, self.rank, self.world_size)
        return self.tables[e]

    def take(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, meta) of the examples at these stream positions of the source, fetching windows until each
        has arrived."""
        pool, n = self.pool, len(positions)
        e, p, j = self.layout.locate(positions)
        slots = np.empty(n, dtype=np.int64)
        rows = np.empty(n, dtype=np.int64)
        one = e.min() == e.max()  # (a mix's partitions may stand in different epochs: e need not be sorted)
        for epoch in [int(e[0])] if one else np.unique(e).tolist():
            sel = slice(None) if one else e == epoch
            tab = self.table(epoch)
            wid = tab.lookup(p[sel], j[sel])
            while (tab.slot[wid] < 0).any():  # a window this step needs has not arrived yet
                item = next(self.items)
                if isinstance(item, _Failure):
                    raise item.error
                w = item.window
                slot = pool.put(item)
                owner = self.table(w.epoch)
                owner.slot[owner.wid(w)] = slot
                heapq.heappush(self.expiry, (self.layout.lane_index(w), w.epoch, owner.wid(w), slot))
                self.note(item)
            slots[sel] = tab.slot[wid]
            rows[sel] = pool.order[tab.slot[wid], j[sel] - tab.j0[wid]]
        return pool.ids[slots, rows], pool.meta[slots, rows]

    def release(self, done: int) -> None:
        """Every partition of this rank has trained its examples before lane index ``done``: free the windows
        that end before it, and the tables of epochs left behind."""
        while self.expiry and self.expiry[0][0] < done:
            _, epoch, wid, slot = heapq.heappop(self.expiry)
            self.tables[epoch].slot[wid] = -1
            self.pool.release(slot)
        if len(self.tables) > 1:  # an epoch behind: drop its table once none of its windows is open
            behind = done // self.layout.span
            for epoch in [k for k in self.tables if k < behind and not (self.tables[k].slot >= 0).any()]:
                del self.tables[epoch]


class PretrainStream:
    """Yields, per optimizer step from ``start_step`` on (endlessly), this rank's ``grad_accum``
    micro-batches.

    ``shards``: a shard prefix (with its ``manifest``), or several ``Source``s mixed by weight (data/mix.py).
    ``partitions``: ``P`` (see the module docstring); ``world_size`` must divide it. ``on_corrupt_shard``:
    "error" (a corrupt block raises its DataError) or "skip" (see the module docstring).
    """

    def __init__(
        self,
        shards: str | Sequence[Source],
        manifest: Manifest | None = None,
        *,
        seed: int,
        global_batch_size: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        partitions: int,
        shuffle_blocks: int = 1,
        num_workers: int = 2,
        prefetch_factor: int = 2,
        start_step: int = 0,
        on_corrupt_shard: str = "error",
        pin_memory: bool = False,
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
        if num_workers < 0 or start_step < 0 or prefetch_factor < 1:
            raise ValueError("num_workers and start_step must be >= 0, prefetch_factor >= 1")
        if on_corrupt_shard not in ("error", "skip"):
            raise ValueError(f"on_corrupt_shard={on_corrupt_shard!r}: choose error or skip")
        if partitions % world_size:
            raise DataError(f"world size {world_size} does not divide partitions={partitions}")
        if isinstance(shards, str):
            if manifest is None:
                raise ValueError("a shard prefix needs its manifest")
            shards = [Source(source_name(shards), shards, manifest)]
        self.sources = list(shards)
        check_sources(self.sources)
        self.manifest, self.seed = self.sources[0].manifest, seed
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.prefetch_factor, self.start_step = num_workers, prefetch_factor, start_step
        self.on_corrupt_shard, self.pin_memory = on_corrupt_shard, pin_memory
        self.grad_accum = global_batch_size // (micro_batch_size * world_size)
        # One source keeps the seeds of a run on data.shards, so that it is that run exactly; in a mix each
        # source shuffles with its own.
        several = len(self.sources) > 1
        self.layouts = [
            StreamLayout(s.manifest, seed, partitions, shuffle_blocks, key=(seed, k) if several else ())
            for k, s in enumerate(self.sources)
        ]
        self.layout = self.layouts[0]
        self.mix = SourceMix([s.weight for s in self.sources], partitions, seed)
        self.sep_id = self.manifest.special_ids["sep"]
        self.skipped: list[str] = []  # bad blocks this rank left out so far ("skip"), once per window
        self._warned: set[str] = set()

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    def source_examples(self, step: int) -> list[int]:
        """How many examples each source has given the run in its first ``step`` steps (all ranks)."""
        return self.mix.totals(step * self.global_batch_size)

    def position(self, step: int) -> dict:
        """Where the stream stands after ``step`` optimizer steps, for the trainer's saved state."""
        g = step * self.global_batch_size
        if len(self.sources) == 1:
            return {
                "samples_seen": g,
                "stream_position": g,
                "epoch": g // self.layout.epoch_size,
                "offset_in_epoch": g % self.layout.epoch_size,
                "partitions": self.layout.partitions,
                "epoch_size": self.layout.epoch_size,
            }
        return {
            "samples_seen": g,
            "stream_position": g,
            "partitions": self.layout.partitions,
            "sources": [
                {
                    "name": s.name,
                    "shards": s.prefix,
                    "weight": w,
                    "examples": n,
                    "epochs": n / layout.epoch_size,  # each partition runs through its own epochs at about this
                    "epoch_size": layout.epoch_size,
                }
                for s, w, n, layout in zip(self.sources, self.mix.weights, self.source_examples(step), self.layouts)
            ],
        }

    def rank_positions(self, step: int) -> np.ndarray:
        """The stream positions this rank consumes at ``step``, micro-batch after micro-batch."""
        base = step * self.global_batch_size + self.rank
        return base + self.world_size * np.arange(self.global_batch_size // self.world_size, dtype=np.int64)

    def __iter__(self) -> Iterator[list[MicroBatch]]:
        cursor = LaneCursor(self.mix, self.rank, self.world_size, self.start_step * self.global_batch_size)
        feeds = []
        for k, (source, layout) in enumerate(zip(self.sources, self.layouts)):
            first = np.zeros(layout.partitions, dtype=np.int64)  # where each of this rank's partitions resumes
            first[cursor.lanes] = layout.lane_position(cursor.lanes, cursor.next[k, cursor.lanes])
            reader = _WindowReader(
                source.prefix, source.manifest, layout, self.rank, self.world_size, first, self.on_corrupt_shard
            )
            if self.num_workers > 0:
                # The loader gets its own generator: by default it draws its workers' base seed from torch's
                # global RNG, which also drives dropout, and a resumed run would then see a shifted dropout stream.
                items = iter(
                    DataLoader(
                        reader,
                        batch_size=None,
                        num_workers=self.num_workers,
                        prefetch_factor=self.prefetch_factor,
                        generator=torch.Generator().manual_seed(self.seed),
                        persistent_workers=False,
                    )
                )
            else:
                items = iter(reader)
            feeds.append(_Feed(layout, source.manifest, items, self.rank, self.world_size, self._note_skips))
        return self._steps(cursor, feeds)

    def _steps(self, cursor: LaneCursor, feeds: list[_Feed]) -> Iterator[list[MicroBatch]]:
        """Cut this rank's steps: each position's source and its index there (the cursor), then each source's
        examples gathered from its windows."""
        n, seq_len = self.global_batch_size // self.world_size, self.manifest.seq_len
        for step in itertools.count(self.start_step):
            pos = self.rank_positions(step)
            src, index = cursor.advance(pos)
            if len(feeds) == 1:  # the source's positions are the run's
                ids, meta = feeds[0].take(pos)
            else:
                ids = np.empty((n, seq_len), dtype=np.dtype(self.manifest.dtype))
                meta = np.empty((n, 4), dtype=np.int64)
                for k, feed in enumerate(feeds):
                    sel = np.flatnonzero(src == k)
                    if len(sel):
                        lane = pos[sel] % feed.layout.partitions
                        ids[sel], meta[sel] = feed.take(feed.layout.lane_position(lane, index[sel]))
            for k, feed in enumerate(feeds):
                feed.release(cursor.done(k))
            yield self._micro_batches(pos, ids, meta, src)

    def _micro_batches(self, pos: np.ndarray, ids: np.ndarray, meta: np.ndarray, src: np.ndarray) -> list[MicroBatch]:
        # Slices of contiguous arrays, each wrapped once: no copies, and no per-tensor split calls.
        m, columns = self.micro_batch_size, np.ascontiguousarray(meta.T)  # [4, n]: one row per field
        out = []
        for k in range(0, len(pos), m):
            lengths, first_sep, candidates, samples = (torch.from_numpy(c) for c in columns[:, k : k + m])
            tokens, positions = torch.from_numpy(ids[k : k + m]), torch.from_numpy(pos[k : k + m])
            if self.pin_memory:  # page-locked, so that the copy to the GPU need not block the host
                tokens, lengths, first_sep, positions = (
                    t.pin_memory() for t in (tokens, lengths, first_sep, positions)
                )
            out.append(
                MicroBatch(
                    tokens=tokens,
                    lengths=lengths,
                    first_sep=first_sep,
                    candidates=candidates,
                    positions=positions,
                    samples=samples,
                    sources=torch.from_numpy(src[k : k + m]),
                )
            )
        return out

    def _note_skips(self, item: _Decoded) -> None:
        for why in item.skipped:
            self.skipped.append(why)
            if why not in self._warned:
                self._warned.add(why)
                log.warning(
                    "data.on_corrupt_shard=skip: rank %d leaves out a bad block (%d so far) and fills its slots "
                    "from the same partition: %s",
                    self.rank,
                    len(self._warned),
                    why,
                )
