"""The data pipeline end to end on real files and a real S3 server: prepare -> shards -> stream."""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from electra_scale.data import (
    DataError,
    PretrainStream,
    load_manifest,
    load_tokenizer,
    prepare,
    read_block,
    read_shard,
    resolve_partitions,
    save_tokenizer,
    special_ids,
    tokenizer_sha256,
)
from electra_scale.data.mix import LaneCursor
from electra_scale.data.stream import Source, check_same_mix, check_sources
from electra_scale.infra import storage
from tests.cli import run_cli

SEQ_LEN = 64
SEED = 7
# Pseudo-words from syllables: a few thousand distinct words, so a small vocab needs ##subword pieces.
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "vel", "dor", "in", "gra", "pho", "sun", "e", "str", "ous"]
COMMON = ["the", "a", "of", "and", "to", "in", "is", "was", "it", "for"]


# --------------------------------------------------------------------------------------------- corpus
def _make_documents(n: int, rng: random.Random) -> list[list[list[str]]]:
    """n documents, each a list of paragraphs, each a list of sentences (known exactly, for the reference)."""

    def sentence() -> str:
        words = [
            rng.choice(COMMON) if rng.random() < 0.3 else "".join(rng.choices(SYLLABLES, k=rng.randint(1, 4)))
            for _ in range(rng.randint(2, 30))
        ]
        if rng.random() < 0.05:  # literal special tokens in the text must stay ordinary text
            words.insert(1, rng.choice(["[SEP]", "[CLS]", "[MASK]"]))
        if rng.random() < 0.1:
            words.insert(1, str(rng.randint(1, 2000)))
        return " ".join(words).capitalize() + rng.choice([".", "!", "?"])

    return [[[sentence() for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(1, 5))] for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[list[str], list[list[str]]]:
    """The same kind of corpus in .txt, .jsonl and .jsonl.gz; returns (files, each document's sentences)."""
    root = tmp_path_factory.mktemp("corpus")
    docs = _make_documents(300, random.Random(0))
    txt, jsonl, jsonl_gz = docs[:100], docs[100:200], docs[200:]
    (root / "a.txt").write_text("\n\n".join("\n".join(" ".join(p) for p in d) for d in txt) + "\n")
    lines = [json.dumps({"text": "\n".join(" ".join(p) for p in d), "id": i}) for i, d in enumerate(jsonl)]
    (root / "b.jsonl").write_text("\n".join(lines) + "\n")
    lines = [json.dumps({"text": "\n\n".join(" ".join(p) for p in d)}) for d in jsonl_gz]
    with gzip.open(root / "c.jsonl.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    files = [str(root / "a.txt"), str(root / "b.jsonl"), str(root / "c.jsonl.gz")]
    return files, [[s for p in d for s in p] for d in docs]


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    files, _ = corpus
    out = str(tmp_path_factory.mktemp("shards") / "out")
    manifest = prepare(
        files, out, "train:600", seq_len=SEQ_LEN, samples_per_shard=37, samples_per_block=8, seed=SEED, progress=False
    )
    return out, manifest


# --------------------------------------------------------------------------------------------- helpers
class ReferenceExampleBuilder:
    """google-research/electra build_pretraining_dataset.py ExampleBuilder, transcribed with an explicit RNG
    and returning id lists instead of tf.train.Examples. Fed one line per sentence, a blank line per doc
    end."""

    def __init__(self, tokenize, max_length, rng, cls_id, sep_id):
        self._tokenize, self._rng, self._cls, self._sep = tokenize, rng, cls_id, sep_id
        self._current_sentences = []
        self._current_length = 0
        self._max_length = max_length
        self._target_length = max_length

    def add_line(self, line):
        line = line.strip().replace("\n", " ")
        if (not line) and self._current_length != 0:  # empty lines separate docs
            return self._create_example()
        bert_tokids = self._tokenize(line)
        self._current_sentences.append(bert_tokids)
        self._current_length += len(bert_tokids)
        if self._current_length >= self._target_length:
            return self._create_example()
        return None

    def _create_example(self):
        if self._rng.random() < 0.1:
            first_segment_target_length = 100000
        else:
            first_segment_target_length = (self._target_length - 3) // 2
        first_segment = []
        second_segment = []
        for sentence in self._current_sentences:
            if (
                len(first_segment) == 0
                or len(first_segment) + len(sentence) < first_segment_target_length
                or (
                    len(second_segment) == 0
                    and len(first_segment) < first_segment_target_length
                    and self._rng.random() < 0.5
                )
            ):
                first_segment += sentence
            else:
                second_segment += sentence
        first_segment = first_segment[: self._max_length - 2]
        second_segment = second_segment[: max(0, self._max_length - len(first_segment) - 3)]
        self._current_sentences = []
        self._current_length = 0
        if self._rng.random() < 0.05:
            self._target_length = self._rng.randint(5, self._max_length)
        else:
            self._target_length = self._max_length
        input_ids = [self._cls] + first_segment + [self._sep]
        if second_segment:
            input_ids += second_segment + [self._sep]
        return input_ids


def all_shard_samples(prefix: str, manifest) -> list[np.ndarray]:
    return [x for i in range(len(manifest.shards)) for x in read_shard(prefix, manifest, i)]


def expected_examples(
    manifest, corpus: list[np.ndarray], seed: int, partitions: int, shuffle_blocks: int, n: int, key: tuple = ()
):
    """The corpus index of the examples at stream positions 0..n-1, straight from the definition in
    data/stream.py's docstring, with plain lists (independent of stream.py's arrays and pools). ``key``: what
    seeds the shuffles, ``(seed,)`` unless given (a mix's source k: ``(seed, k)``)."""
    key = key or (seed,)
    blocks, first = [], 0  # each block's corpus indices, in prepare's order
    for shard in manifest.shards:
        for b in shard.blocks:
            blocks.append(list(range(first, first + b.samples)))
            first += b.samples
    total = len(corpus)
    span = -(-total // partitions)
    epoch_size = span * partitions
    out = []
    for g in range(n):
        e, i = divmod(g, epoch_size)
        p, j = i % partitions, i // partitions
        order = list(np.random.default_rng([*key, e]).permutation(len(blocks)))
        seq_blocks = order + order  # the sequence runs on into its own first blocks (padding)
        bounds, pos = [], 0  # (block index in the sequence, its [start, end) in the sequence)
        for k, b in enumerate(seq_blocks):
            bounds.append((k, pos, pos + len(blocks[b])))
            pos += len(blocks[b])
        lo, hi = p * span, (p + 1) * span
        meeting = [(k, a, z) for k, a, z in bounds if a < hi and z > lo]
        windows = [meeting[x : x + shuffle_blocks] for x in range(0, len(meeting), shuffle_blocks)]
        for w, group in enumerate(windows):
            members = [blocks[seq_blocks[k]][x - a] for k, a, z in group for x in range(max(a, lo), min(z, hi))]
            j0 = max(group[0][1], lo) - lo
            if j0 <= j < j0 + len(members):
                perm = np.random.default_rng([*key, e, p, w]).permutation(len(members))
                out.append(members[perm[j - j0]])
                break
    return out


def take(stream: PretrainStream, steps: int) -> list[list]:
    """``steps`` steps: per step, [(positions, input_ids, attention_mask, token_type_ids, samples, sources) per
    micro-batch]."""
    out = []
    for step in stream:
        out.append(
            [(mb.positions, mb.input_ids, mb.attention_mask, mb.token_type_ids, mb.samples, mb.sources) for mb in step]
        )
        if len(out) == steps:
            return out
    raise AssertionError("stream ended")


def global_batches(streams_steps: list[list[list]]) -> list[tuple[np.ndarray, ...]]:
    """Merge several ranks' steps into per-step (positions, input_ids, attention_mask, token types, samples,
    sources) sorted by position."""
    merged = []
    for per_rank in zip(*streams_steps):
        fields = [np.concatenate([mb[f].numpy() for rank_step in per_rank for mb in rank_step]) for f in range(6)]
        order = np.argsort(fields[0])
        merged.append(tuple(x[order] for x in fields))
    return merged


def make_stream(prefix, manifest, **kw) -> PretrainStream:
    args = dict(seed=SEED, global_batch_size=8, micro_batch_size=4, rank=0, world_size=1, partitions=4, num_workers=0)
    args.update(kw)
    return PretrainStream(prefix, manifest, **args)


def unpad(row: np.ndarray, length: int) -> tuple:
    return tuple(int(x) for x in row[:length])


# --------------------------------------------------------------------------------------------- prepare
def test_prepare_matches_reference_example_builder(prepared, corpus):
    out, manifest = prepared
    _, docs = corpus
    ids = manifest.special_ids
    assert ids == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert manifest.dtype == "uint16" and manifest.seq_len == SEQ_LEN and manifest.seed == SEED

    # Independent path: the saved vocab.txt (a plain BERT WordPiece pipeline) + the reference's builder.
    vocab_tok = load_tokenizer(os.path.join(out, "vocab.txt"))
    ref = ReferenceExampleBuilder(
        lambda line: vocab_tok.encode(line, add_special_tokens=False).ids if line else [],
        SEQ_LEN,
        random.Random(SEED),
        ids["cls"],
        ids["sep"],
    )
    expected = []
    for doc in docs:
        for line in [*doc, ""]:
            example = ref.add_line(line)
            if example:
                expected.append(example)

    samples = all_shard_samples(out, manifest)
    assert all(s.dtype == np.uint16 for s in samples)
    assert [s.tolist() for s in samples] == expected
    for s in samples:
        assert s[0] == ids["cls"] and s[-1] == ids["sep"] and 3 <= len(s) <= SEQ_LEN
        assert int((s == ids["sep"]).sum()) in (1, 2)
        assert not np.isin(s, [ids["pad"], ids["mask"]]).any() and int((s == ids["cls"]).sum()) == 1
    n_seps = [int((s == ids["sep"]).sum()) for s in samples]
    assert 1 in n_seps and 2 in n_seps  # both one- and two-segment examples occur
    assert manifest.num_samples == len(samples) and manifest.num_tokens == sum(len(s) for s in samples)


def test_prepare_manifest_and_files(prepared):
    out, manifest = prepared
    assert load_manifest(out) == manifest
    names = [s.name for s in manifest.shards]
    assert names == [f"train-000000-{i:06d}.tar" for i in range(len(names))] and len(names) > 3  # one unit
    assert all(s.samples == 37 for s in manifest.shards[:-1]) and 0 < manifest.shards[-1].samples <= 37
    # Blocks of 8 (a shard's last one shorter), each with its byte range and CRC-32: a rank reads one block
    # with one ranged GET.
    assert manifest.samples_per_block == 8
    assert [b.samples for b in manifest.shards[0].blocks] == [8, 8, 8, 8, 5]
    for s in manifest.shards:
        data = Path(out, s.name).read_bytes()
        assert len(data) == s.bytes
        assert s.blocks[0].offset == 0 and sum(b.samples for b in s.blocks) == s.samples
        for a, b in zip(s.blocks, s.blocks[1:]):
            assert b.offset == a.offset + a.length  # blocks tile the tar
        for b in s.blocks:
            assert zlib.crc32(data[b.offset : b.offset + b.length]) == b.crc32
    assert sorted(os.listdir(out)) == sorted([*names, "manifest.json", "tokenizer.json", "vocab.txt"])
    tok_json = Path(out, "tokenizer.json").read_text()
    import hashlib

    assert manifest.tokenizer_sha256 == hashlib.sha256(tok_json.encode()).hexdigest()
    vocab = Path(out, "vocab.txt").read_text().splitlines()
    assert len(vocab) == manifest.vocab_size and vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    d = json.loads(Path(out, "manifest.json").read_text())
    first = manifest.shards[0].blocks[0]
    assert d["format"] == "electra-scale-shards/2" and d["shards"][0]["blocks"][0] == [
        first.offset,
        first.length,
        first.samples,
        first.crc32,
    ]
    # A second prepare into the same output is refused rather than mixing two shard sets.
    with pytest.raises(DataError, match="already holds a prepared shard set"):
        prepare([], out, "train:100", seq_len=SEQ_LEN, progress=False)


def test_shards_open_with_plain_webdataset(prepared):
    """Each block is one webdataset sample with two arrays; nothing of ours is needed to read them."""
    import webdataset as wds

    out, manifest = prepared
    urls = [os.path.join(out, s.name) for s in manifest.shards]
    blocks = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert len(blocks) == sum(len(s.blocks) for s in manifest.shards)
    examples = []
    for block in blocks:
        lengths, tokens = block["lengths.npy"], block["tokens.npy"]
        assert tokens.dtype == np.uint16 and int(lengths.sum()) == len(tokens)
        examples += [tuple(x.tolist()) for x in np.split(tokens, np.cumsum(lengths)[:-1])]
    assert examples == [tuple(x.tolist()) for x in all_shard_samples(out, manifest)]
    assert len(examples) == manifest.num_samples


def test_prepare_is_deterministic(prepared, corpus, tmp_path):
    """With the same tokenizer.json (a trained vocab is not reproducible: HF's trainer breaks count ties in
    hash-map order), the same inputs and seed give byte-identical shards."""
    out, manifest = prepared
    again = prepare(
        corpus[0],
        str(tmp_path / "again"),
        os.path.join(out, "tokenizer.json"),
        seq_len=SEQ_LEN,
        samples_per_shard=37,
        samples_per_block=8,
        seed=SEED,
        progress=False,
    )
    assert again.shards == manifest.shards and again.tokenizer_sha256 == manifest.tokenizer_sha256
    for s in manifest.shards:
        assert Path(out, s.name).read_bytes() == (tmp_path / "again" / s.name).read_bytes()


# --------------------------------------------------------------------------------------------- stream
@pytest.mark.parametrize("partitions,shuffle_blocks", [(4, 1), (7, 2), (1, 1)])
def test_stream_follows_its_definition_for_two_epochs(prepared, partitions, shuffle_blocks):
    """Every position holds the example the documented order puts there; each epoch trains every example
    once, plus fewer than P repeats that pad it to P equal spans."""
    out, manifest = prepared
    corpus = all_shard_samples(out, manifest)
    n = manifest.num_samples
    gb = 16
    stream = make_stream(
        out,
        manifest,
        global_batch_size=gb,
        micro_batch_size=8,
        partitions=partitions,
        shuffle_blocks=shuffle_blocks,
        num_workers=2,
    )
    epoch = stream.layout.epoch_size
    assert epoch == partitions * -(-n // partitions) and 0 <= epoch - n < partitions
    batches = global_batches([take(stream, 2 * epoch // gb + 1)])
    pos, ids, mask, _, samples = (np.concatenate([b[f] for b in batches]) for f in range(5))
    assert np.array_equal(pos, np.arange(len(pos)))
    assert samples.tolist() == expected_examples(manifest, corpus, SEED, partitions, shuffle_blocks, len(pos))
    for p in range(len(pos)):  # the ids are those of the example named
        assert unpad(ids[p], int(mask[p].sum())) == tuple(corpus[samples[p]].tolist())
    for e in range(2):
        counts = np.bincount(samples[e * epoch : (e + 1) * epoch], minlength=n)
        assert counts.min() == 1 and counts.sum() - n == epoch - n  # all once, the padding again
    assert samples[:epoch].tolist() != samples[epoch : 2 * epoch].tolist()  # each epoch has its own order
    assert stream.position(epoch // gb + 1) == {
        "samples_seen": (epoch // gb + 1) * gb,
        "stream_position": (epoch // gb + 1) * gb,
        "epoch": (epoch // gb + 1) * gb // epoch,
        "offset_in_epoch": (epoch // gb + 1) * gb % epoch,
        "partitions": partitions,
        "epoch_size": epoch,
    }


def test_token_types_attention_mask_and_padding(prepared):
    out, manifest = prepared
    sp = manifest.special_ids
    steps = take(make_stream(out, manifest, global_batch_size=32, micro_batch_size=16), 6)
    short = 0
    for step in steps:
        for _, input_ids, mask, types, _, _ in step:
            assert input_ids.shape == mask.shape == types.shape == (16, SEQ_LEN)
            for row, m, t in zip(input_ids.tolist(), mask.tolist(), types.tolist()):
                length = next((i for i, v in enumerate(m) if v == 0), SEQ_LEN)
                assert m == [1] * length + [0] * (SEQ_LEN - length)
                assert row[length:] == [sp["pad"]] * (SEQ_LEN - length) and row[length - 1] == sp["sep"]
                first_sep = row.index(sp["sep"])
                assert t == [0] * (first_sep + 1) + [1] * (length - first_sep - 1) + [0] * (SEQ_LEN - length)
                short += length < SEQ_LEN
    assert short > 0  # padding was exercised
    # What the device gets is built from the same few numbers per example, and the loss denominators too.
    from electra_scale.engine.objective import count_batch_targets, count_targets

    mb = next(iter(make_stream(out, manifest, global_batch_size=32, micro_batch_size=16)))[0]
    inputs = mb.model_inputs("cpu")
    assert inputs["input_ids"].dtype == torch.int64 and mb.tokens.dtype == torch.uint16
    assert torch.equal(inputs["attention_mask"], mb.attention_mask)
    assert torch.equal(inputs["token_type_ids"], mb.token_type_ids)
    for p in (0.15, 0.5):
        assert count_batch_targets(mb, p) == count_targets(mb.input_ids, mb.attention_mask, sp, p)


@pytest.mark.filterwarnings("ignore::UserWarning")  # 3 workers on a 2-core machine
def test_world_size_and_workers_do_not_change_global_batches(prepared):
    out, manifest = prepared
    n_steps = manifest.num_samples // 8 + 3  # crosses the epoch boundary
    reference = global_batches([take(make_stream(out, manifest, micro_batch_size=8), n_steps)])
    configs = {
        "1 rank x micro 4 x accum 2": [dict(micro_batch_size=4)],
        "2 ranks x micro 4": [dict(micro_batch_size=4, rank=r, world_size=2, num_workers=2) for r in range(2)],
        "2 ranks x micro 2 x accum 2": [dict(micro_batch_size=2, rank=r, world_size=2) for r in range(2)],
        "4 ranks x micro 2": [dict(micro_batch_size=2, rank=r, world_size=4, num_workers=1) for r in range(4)],
        "1 rank x micro 8, 3 workers, prefetch 1": [dict(micro_batch_size=8, num_workers=3, prefetch_factor=1)],
    }
    for name, ranks in configs.items():
        streams = [make_stream(out, manifest, **kw) for kw in ranks]
        assert streams[0].grad_accum == 8 // (ranks[0]["micro_batch_size"] * ranks[0].get("world_size", 1))
        got = global_batches([take(s, n_steps) for s in streams])
        for step, (ref, new) in enumerate(zip(reference, got)):
            assert all(np.array_equal(a, b) for a, b in zip(ref, new)), f"{name}: step {step} differs"
        assert np.array_equal(reference[1][0], np.arange(8, 16))
    # Rank r of W takes the positions g with g % W == r, micro-batch after micro-batch.
    rank1 = take(make_stream(out, manifest, micro_batch_size=2, rank=1, world_size=2), 2)
    assert [mb[0].tolist() for mb in rank1[1]] == [[9, 11], [13, 15]]


def test_resume_from_step_matches_uninterrupted_stream(prepared):
    out, manifest = prepared
    gb = 8
    boundary = manifest.num_samples // gb  # the step during which epoch 1 begins
    start = boundary - 2
    for kw in (dict(micro_batch_size=4), dict(micro_batch_size=2, rank=1, world_size=2, num_workers=2)):
        full = take(make_stream(out, manifest, global_batch_size=gb, **kw), start + 6)
        resumed = take(make_stream(out, manifest, global_batch_size=gb, start_step=start, **kw), 6)
        for a, b in zip(full[start:], resumed):
            for mb_a, mb_b in zip(a, b):
                assert all(np.array_equal(x.numpy(), y.numpy()) for x, y in zip(mb_a, mb_b))
        assert int(resumed[-1][-1][0].max()) >= manifest.num_samples  # really crossed into epoch 1


def test_stream_rejects_uneven_batch_sizes_and_world_sizes(prepared):
    out, manifest = prepared
    with pytest.raises(ValueError, match="not a multiple of micro_batch_size"):
        make_stream(out, manifest, global_batch_size=10, micro_batch_size=4)
    with pytest.raises(ValueError, match="rank"):
        make_stream(out, manifest, rank=2, world_size=2, micro_batch_size=2)
    # The partition count: the checkpoint's wins; a world size that does not divide it is refused, naming the
    # sizes that do.
    n = manifest.num_samples
    assert resolve_partitions(None, 1, n, None) == 64 and resolve_partitions(None, 3, n, None) == 48
    assert resolve_partitions(None, 128, 10**6, None) == 128 and resolve_partitions(8, 2, n, None) == 8
    assert resolve_partitions(None, 2, n, saved=12) == 12
    with pytest.raises(
        DataError,
        match=r"^world size 8 does not divide the stream's 12 partitions, fixed when this "
        r"run started \(saved in its checkpoint\); run on one of 1, 2, 3, 4, 6, 12 ranks$",
    ):
        resolve_partitions(None, 8, n, saved=12)
    with pytest.raises(DataError, match=r"set data.partitions to a multiple of 4$"):
        resolve_partitions(6, 4, n, None)
    with pytest.raises(DataError, match=r"data.partitions=16 but this run's stream was cut into 12 partitions"):
        resolve_partitions(16, 4, n, saved=12)
    with pytest.raises(DataError, match=rf"more than the shard set's {n} examples"):
        resolve_partitions(n + 1, 1, n, None)


def test_a_rank_reads_only_its_own_blocks(prepared):
    """Counted at the storage layer: over an epoch, the W ranks read disjoint blocks (apart from those that
    straddle two partitions), together each block about once, and each rank about 1/W of the bytes."""
    out, manifest = prepared
    table = manifest.block_table()
    blocks_read = []
    for rank in range(4):
        stream = make_stream(out, manifest, partitions=8, rank=rank, world_size=4, micro_batch_size=2)
        storage.reset_io_stats()
        for _, _ in zip(range(stream.layout.epoch_size // 8), stream):
            pass
        io = storage.reset_io_stats()
        mine = set()
        layout = stream.layout
        for p in range(rank, 8, 4):
            for w in layout.windows(0, p):
                mine |= {b for b, _, _ in w.blocks}
        assert io.gets == len(mine)  # one ranged GET per block of its own partitions, nothing else
        assert io.bytes == int(table.length[sorted(mine)].sum())
        blocks_read.append(mine)
    shared = set.union(*[a & b for i, a in enumerate(blocks_read) for b in blocks_read[i + 1 :]])
    assert len(shared) <= 8  # at most one block straddles each partition boundary
    assert set.union(*blocks_read) == set(range(len(table)))


# --------------------------------------------------------------------------------------------- mixing
WEIGHTS = (0.3, 0.7)


@pytest.fixture(scope="module")
def mixed(prepared, tmp_path_factory) -> list[Source]:
    """Two sources with one tokenizer: the module's shard set ("general", 0.3) and a small one ("contracts",
    0.7) written by prepare with the first's tokenizer.json, which runs through many epochs meanwhile."""
    out, manifest = prepared
    root = tmp_path_factory.mktemp("contracts")
    docs = _make_documents(30, random.Random(1))
    (root / "c.txt").write_text("\n\n".join("\n".join(" ".join(p) for p in d) for d in docs) + "\n")
    tokenizer = os.path.join(out, "tokenizer.json")
    small = prepare(
        [str(root / "c.txt")],
        str(root / "contracts"),
        tokenizer,
        seq_len=SEQ_LEN,
        samples_per_block=4,
        seed=SEED,
        progress=False,
    )
    return [
        Source("general", out, manifest, WEIGHTS[0]),
        Source("contracts", str(root / "contracts"), small, WEIGHTS[1]),
    ]


def mixed_stream(sources, **kw) -> PretrainStream:
    args = dict(seed=SEED, global_batch_size=16, micro_batch_size=8, rank=0, world_size=1, partitions=4, num_workers=0)
    return PretrainStream(sources, **{**args, **kw})


def test_mix_draws_its_sources_in_proportion_each_through_its_own_epochs(mixed):
    """Every global batch takes each source within 2 examples of its share, the whole run within 2 examples at
    every step; the draws of source k in partition p are, in order, source k's own stream of partition p (its
    epochs, its reshuffles), and the small source repeats evenly."""
    steps, gb, partitions = 300, 16, 4
    stream = mixed_stream(mixed, partitions=partitions)
    batches = global_batches([take(stream, steps)])
    per_step = np.stack([np.bincount(b[5], minlength=2) for b in batches])
    assert np.abs(per_step - gb * np.array(WEIGHTS)).max() <= 2
    drawn = np.cumsum(per_step, axis=0)
    assert np.abs(drawn - np.outer(np.arange(1, steps + 1) * gb, WEIGHTS)).max() <= 2
    assert stream.source_examples(steps) == drawn[-1].tolist()
    share = drawn[-1] / drawn[-1].sum()
    deviation = np.abs(per_step - gb * np.array(WEIGHTS)).max()
    print(
        f"mix over {steps} steps of {gb}: {dict(zip(stream.source_names, drawn[-1].tolist()))} = {share.round(4)}, "
        f"per-step deviation <= {deviation:.1f}"
    )
    assert np.allclose(share, WEIGHTS, atol=2 / (steps * gb))

    pos, ids, mask, _, samples, src = (np.concatenate([b[f] for b in batches]) for f in range(6))
    for k, source in enumerate(mixed):
        mine = np.flatnonzero(src == k)  # in position order
        lane = pos[mine] % partitions
        index = np.zeros(len(mine), dtype=np.int64)  # the i-th draw of source k in its lane
        for p in range(partitions):
            index[lane == p] = np.arange(int((lane == p).sum()))
        local = stream.layouts[k].lane_position(lane, index)
        corpus = all_shard_samples(source.prefix, source.manifest)
        n = min(int(local.max()) + 1, 700)
        expected = np.array(expected_examples(source.manifest, corpus, SEED, partitions, 1, n, key=(SEED, k)))
        first = local < n
        assert samples[mine[first]].tolist() == expected[local[first]].tolist()
        for row in mine[:: max(1, len(mine) // 200)]:  # the ids are those of the example named
            assert unpad(ids[row], int(mask[row].sum())) == tuple(corpus[samples[row]].tolist())
    # The small source's stream positions [0, c E) are its first c epochs, trained whole: every example c times,
    # plus the fewer than P that pad each epoch (its partitions' lanes stand a few examples apart).
    epoch_size, n_small = stream.layouts[1].epoch_size, mixed[1].manifest.num_samples
    full = int(local.max()) // epoch_size - 1
    counts = np.bincount(samples[mine[local < full * epoch_size]], minlength=n_small)
    assert full > 20 and counts.min() == full and counts.sum() == full * epoch_size
    general = stream.position(steps)["sources"][0]
    assert general["examples"] == drawn[-1][0] and 1 < general["epochs"] < 2


@pytest.mark.filterwarnings("ignore::UserWarning")  # workers on a 2-core machine
def test_mix_is_the_same_on_any_world_size_and_when_resumed(mixed):
    """The union of the ranks' batches is the 1-rank global batch, on 2 and 4 ranks, and a stream started at a
    saved step (on 1 or 2 ranks) continues the uninterrupted one exactly."""
    steps, start = 60, 37  # the small source is in its 8th epoch at the resumed step
    reference = global_batches([take(mixed_stream(mixed), steps)])
    configs = {
        "2 ranks x micro 4, 2 workers": [
            dict(micro_batch_size=4, rank=r, world_size=2, num_workers=2) for r in range(2)
        ],
        "4 ranks x micro 2 x accum 2": [dict(micro_batch_size=2, rank=r, world_size=4) for r in range(4)],
        "resumed at step 37 on 1 rank": [dict(start_step=start)],
        "resumed at step 37 on 2 ranks": [
            dict(micro_batch_size=4, rank=r, world_size=2, start_step=start) for r in range(2)
        ],
    }
    for name, ranks in configs.items():
        first = ranks[0].get("start_step", 0)
        got = global_batches([take(mixed_stream(mixed, **kw), steps - first) for kw in ranks])
        for step, (ref, new) in enumerate(zip(reference[first:], got), first):
            assert all(np.array_equal(a, b) for a, b in zip(ref, new)), f"{name}: step {step} differs"
    assert set(np.concatenate([b[5] for b in reference[start:]]).tolist()) == {0, 1}


def test_mix_rank_reads_only_its_own_partitions_of_each_source(mixed):
    """Counted at the storage layer: rank r of 2 fetches the blocks of its own partitions of each source that its
    steps reach (one ranged GET each, its block cache holding them across epochs), and the two ranks' blocks in
    an epoch of a source overlap only where a block straddles two partitions."""
    steps, partitions = 60, 4
    read = []
    for rank in range(2):
        stream = mixed_stream(mixed, micro_batch_size=4, rank=rank, world_size=2, partitions=partitions)
        cursor = LaneCursor(stream.mix, rank, 2, steps * stream.global_batch_size)  # the draws after the steps
        storage.reset_io_stats()
        for _ in zip(range(steps), stream):
            pass
        io = storage.reset_io_stats()
        mine = []  # (source, block) of the windows this rank's lanes reached
        for k, layout in enumerate(stream.layouts):
            for p in cursor.lanes.tolist():
                reached = int(cursor.next[k, p])  # lane indices [0, reached) were trained
                for e in range(-(-reached // layout.span)):
                    for w in layout.windows(e, p):
                        if e * layout.span + w.j0 < reached:
                            mine += [(k, e, b) for b, _, _ in w.blocks]
        read.append(set(mine))
        mine = {(k, b) for k, _, b in mine}
        # Each of those once, and at most one window more per partition and source: the one read ahead, because
        # the windows come in the order partitions first need them, and a mix's partitions move at slightly
        # different paces. Nothing of another rank's partitions.
        ahead = len(cursor.lanes) * len(mixed)
        largest = max(int(layout.table.length.max()) for layout in stream.layouts)
        assert len(mine) <= io.gets <= len(mine) + ahead
        least = sum(int(stream.layouts[k].table.length[b]) for k, b in mine)
        assert least <= io.bytes <= least + ahead * largest
    for k, e in {(k, e) for k, e, _ in read[0]}:  # each epoch of each source: the ranks' blocks barely overlap
        a, b = ({blk for src, epoch, blk in r if (src, epoch) == (k, e)} for r in read)
        assert a and b and len(a & b) <= partitions  # at most one block straddles each partition boundary


def test_mix_sources_must_share_tokenizer_and_seq_len(mixed, corpus, tmp_path):
    """Checked before any shard is read, in one line naming both sources; so is a resume with another mix."""
    files, _ = corpus
    tokenizer = os.path.join(mixed[0].prefix, "tokenizer.json")
    other = prepare(files[:1], str(tmp_path / "other"), "train:300", seq_len=SEQ_LEN, seed=SEED, progress=False)
    shorter = prepare(files[:1], str(tmp_path / "short"), tokenizer, seq_len=32, seed=SEED, progress=False)
    with pytest.raises(
        DataError, match=r"^data.sources 'general' \(.*\) and 'other' \(.*\) were tokenized with different tokenizers"
    ):
        mixed_stream([mixed[0], Source("other", str(tmp_path / "other"), other)])
    with pytest.raises(DataError, match=r"^data.sources 'general' .* were built with seq_len 64 and 32; re-run"):
        check_sources([mixed[0], Source("short", str(tmp_path / "short"), shorter)])
    saved = mixed_stream(mixed).position(10)
    check_same_mix(saved, [Source(s.name, s.prefix, s.manifest, 10 * s.weight) for s in mixed])  # same shares
    with pytest.raises(DataError, match=r"trained on general \(weight 0.3\), contracts \(weight 0.7\), and the config"):
        check_same_mix(saved, [Source(s.name, s.prefix, s.manifest, 0.5) for s in mixed])
    with pytest.raises(DataError, match=r"trained on one shard set \(data.shards\), and the config now gives general"):
        check_same_mix(mixed_stream(mixed[:1]).position(10), mixed)


# --------------------------------------------------------------------------------------------- S3
def test_s3_round_trip(prepared, corpus, s3_bucket):
    """Inputs, tokenizer and shards on S3: the same shards as the local run, streamed by 2 workers."""
    local_out, local_manifest = prepared
    inputs = []
    for f in [*corpus[0], os.path.join(local_out, "tokenizer.json")]:
        url = f"{s3_bucket}/raw/{Path(f).name}"
        storage.upload_file(f, url)
        inputs.append(url)
    out = f"{s3_bucket}/shards/v1"
    manifest = prepare(
        inputs[:3],
        out,
        inputs[3],
        seq_len=SEQ_LEN,
        samples_per_shard=37,
        samples_per_block=8,
        seed=SEED,
        progress=False,
    )
    assert load_manifest(out) == manifest and manifest.prefix == out
    assert manifest.shards == local_manifest.shards
    assert manifest.tokenizer_sha256 == local_manifest.tokenizer_sha256
    files = storage.list_files(out)
    assert sorted(files) == sorted([s.name for s in manifest.shards] + ["manifest.json", "tokenizer.json", "vocab.txt"])
    last = manifest.shards[-1].name
    assert storage.read_bytes(f"{out}/{last}") == Path(local_out, last).read_bytes()

    # Streamed from S3 by 2 ranks with 2 workers each: the same global batches as one rank on local disk.
    epoch = make_stream(out, manifest).layout.epoch_size
    n_steps = epoch // 16 + 1
    s3_ranks = [
        take(
            make_stream(out, manifest, global_batch_size=16, micro_batch_size=4, rank=r, world_size=2, num_workers=2),
            n_steps,
        )
        for r in range(2)
    ]
    local_steps = take(make_stream(local_out, local_manifest, global_batch_size=16, micro_batch_size=8), n_steps)
    s3_batches, local_batches = global_batches(s3_ranks), global_batches([local_steps])
    for got, ref in zip(s3_batches, local_batches):
        assert all(np.array_equal(a, b) for a, b in zip(got, ref))
    samples = np.concatenate([b[4] for b in s3_batches])[:epoch]
    assert sorted(set(samples.tolist())) == list(range(manifest.num_samples))


# --------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_specs(prepared, tmp_path):
    out, manifest = prepared
    trained = load_tokenizer(os.path.join(out, "tokenizer.json"))
    assert tokenizer_sha256(trained) == manifest.tokenizer_sha256
    from_vocab = load_tokenizer(os.path.join(out, "vocab.txt"))
    text = "The kalomi of phosunvel was strousgra, 1999 [SEP] times!"
    # A tokenizer.json from training registers the specials as added tokens, so a literal "[SEP]" in text
    # becomes the real one unless encode_special_tokens is set (prepare sets it); a vocab.txt never does.
    assert trained.encode(text).ids.count(3) == 2 and from_vocab.encode(text).ids.count(3) == 1
    trained.encode_special_tokens = True
    assert from_vocab.encode(text).ids == trained.encode(text).ids
    assert trained.encode(text).ids[0] == 2 and trained.encode(text).ids[-1] == 3  # [CLS] ... [SEP]
    assert special_ids(from_vocab) == special_ids(trained) == manifest.special_ids

    fresh = load_tokenizer("train:200", texts=lambda: iter(["hello world", "hello there", "worldly things"] * 5))
    assert special_ids(fresh) == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert fresh.get_vocab_size() <= 200 and fresh.token_to_id("hello") is not None

    # A BERT-layout vocab ([PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103), uppercase kept.
    bert = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    bert += ["hello", "world", "Hello", "##s"]
    (tmp_path / "vocab.txt").write_text("\n".join(bert) + "\n")
    tok = load_tokenizer(str(tmp_path / "vocab.txt"), lowercase=False)
    assert special_ids(tok) == {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}
    assert tok.encode("Hello worlds zzz", add_special_tokens=False).ids == [106, 105, 107, 100]
    assert load_tokenizer(str(tmp_path / "vocab.txt")).encode("Hello", add_special_tokens=False).ids == [104]

    save_tokenizer(tok, str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "vocab.txt").read_text().splitlines() == bert
    assert tokenizer_sha256(load_tokenizer(str(tmp_path / "saved" / "tokenizer.json"))) == tokenizer_sha256(tok)

    with pytest.raises(ValueError, match=r"vocab\.txt.*tokenizer\.json.*train:"):
        load_tokenizer(str(tmp_path / "vocab.bin"))
    with pytest.raises(ValueError, match="train:N needs an integer"):
        load_tokenizer("train:lots", texts=lambda: iter(["x"]))
    (tmp_path / "nospecial.txt").write_text("[UNK]\nhello\n")
    with pytest.raises(ValueError, match=r"lacks the special token\(s\) \[PAD\] \[CLS\] \[SEP\] \[MASK\]"):
        special_ids(load_tokenizer(str(tmp_path / "nospecial.txt")))


# --------------------------------------------------------------------------------------------- errors
def test_manifest_errors(prepared, tmp_path):
    out, manifest = prepared
    with pytest.raises(DataError, match=r"no manifest\.json at .*empty: is this the output of `electra-scale"):
        load_manifest(str(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_manifest(str(tmp_path / "bad"))
    (tmp_path / "bad" / "manifest.json").write_text(json.dumps({"format": "something-else/9"}))
    with pytest.raises(DataError, match="expected 'electra-scale-shards/2'"):
        load_manifest(str(tmp_path / "bad"))
    # A set of the first format is refused with the command that converts it.
    (tmp_path / "bad" / "manifest.json").write_text(json.dumps({"format": "electra-scale-shards/1"}))
    with pytest.raises(DataError, match=rf"convert-shards {tmp_path / 'bad'} {tmp_path / 'bad'}-v2`, then point"):
        load_manifest(str(tmp_path / "bad"))

    manifest.check_compatible(vocab_size=manifest.vocab_size, seq_len=SEQ_LEN)
    msg = f"vocab_size {manifest.vocab_size} but model.vocab_size is 30522; set model.vocab_size="
    with pytest.raises(DataError, match=msg):
        manifest.check_compatible(vocab_size=30522, seq_len=SEQ_LEN)
    with pytest.raises(DataError, match=f"seq_len {SEQ_LEN} but the training seq_len is 128"):
        manifest.check_compatible(vocab_size=manifest.vocab_size, seq_len=128)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_truncated_corrupt_and_missing_shards(prepared, tmp_path):
    out, _ = prepared
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    manifest = load_manifest(str(broken))
    info = manifest.shards[2]
    victim = broken / info.name
    data = victim.read_bytes()
    third = info.blocks[2]
    # Cut inside the third block: the first two still read; the third names the byte where the file ends.
    victim.write_bytes(data[: third.offset + 700])
    assert len(read_block(str(broken), manifest, 2, info.blocks[1])[1]) == 8
    with pytest.raises(DataError, match=rf"^shard {victim} is truncated at byte {third.offset + 700}: its block at "):
        read_block(str(broken), manifest, 2, third)
    last = info.blocks[-1].offset
    with pytest.raises(DataError, match=rf"^shard {victim} is truncated: it ends before byte {last}, where one of"):
        read_block(str(broken), manifest, 2, info.blocks[-1])  # past the end: no bytes at all
    # One flipped byte anywhere in a block: its CRC-32 names it.
    flipped = bytearray(data)
    flipped[third.offset + third.length - 600] ^= 0x40
    victim.write_bytes(bytes(flipped))
    with pytest.raises(DataError, match=rf"^shard {victim} is corrupt in its block at bytes {third.offset}-"):
        read_block(str(broken), manifest, 2, third)

    # The stream surfaces the worker's error as the same DataError, with its one-line message.
    victim.write_bytes(data[: len(data) // 3])
    gb = 8
    for workers in (0, 2):
        stream = make_stream(str(broken), manifest, global_batch_size=gb, num_workers=workers)
        with pytest.raises(DataError, match=rf"^shard {victim} is truncated[^\n]+$"):
            take(stream, manifest.num_samples // gb + 1)

    victim.unlink()
    stream = make_stream(str(broken), manifest, global_batch_size=gb, num_workers=2)
    with pytest.raises(storage.StorageError, match=rf"^{victim} does not exist"):
        take(stream, manifest.num_samples // gb + 1)


def test_convert_shards_of_the_first_format(prepared, tmp_path):
    """A version-1 set (one example per tar member, as earlier releases wrote) converts with every example
    in its order; the converted set streams."""
    import webdataset as wds

    out, manifest = prepared
    old = tmp_path / "v1"
    old.mkdir()
    examples = all_shard_samples(out, manifest)
    shards = []
    for k in range(0, len(examples), 50):
        name = f"train-{k // 50:06d}.tar"
        with wds.TarWriter(str(old / name)) as tar:
            for i, ex in enumerate(examples[k : k + 50], start=k):
                tar.write({"__key__": f"{i:09d}", "ids.npy": ex})
        shards.append({"name": name, "samples": len(examples[k : k + 50]), "bytes": (old / name).stat().st_size})
    for name in ("tokenizer.json", "vocab.txt"):
        shutil.copy(Path(out, name), old / name)
    d = json.loads(Path(out, "manifest.json").read_text())
    d.pop("samples_per_block")
    (old / "manifest.json").write_text(json.dumps({**d, "format": "electra-scale-shards/1", "shards": shards}))

    proc = run_cli(["convert-shards", str(old), str(tmp_path / "v2"), "--samples-per-block", "16"], check=False)
    assert proc.returncode == 0, proc.stderr
    new = load_manifest(str(tmp_path / "v2"))
    assert [x.tolist() for x in all_shard_samples(str(tmp_path / "v2"), new)] == [x.tolist() for x in examples]
    assert new.samples_per_block == 16 and new.tokenizer_sha256 == manifest.tokenizer_sha256
    assert (tmp_path / "v2" / "vocab.txt").read_bytes() == Path(out, "vocab.txt").read_bytes()
    next(iter(make_stream(str(tmp_path / "v2"), new)))

    # Converting again into the same place, or converting a current set, is refused in one line.
    proc = run_cli(["convert-shards", str(old), str(tmp_path / "v2")], check=False)
    assert proc.returncode == 2 and "already holds a prepared shard set" in proc.stderr
    proc = run_cli(["convert-shards", str(tmp_path / "v2"), str(tmp_path / "v3")], check=False)
    assert proc.returncode == 2 and "convert-shards reads 'electra-scale-shards/1' sets only" in proc.stderr


def test_input_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "One sentence here."}\n\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=rf'{bad} line 3: expected an object with a string "text" field'):
        prepare([str(bad)], str(tmp_path / "o1"), "train:100", seq_len=SEQ_LEN, progress=False)
    bad.write_text('{"text": "One sentence here."}\n{"text": "unterminated\n')
    with pytest.raises(DataError, match=rf"{bad} line 2: not valid JSON"):
        prepare([str(bad)], str(tmp_path / "o2"), "train:100", seq_len=SEQ_LEN, progress=False)
    with pytest.raises(DataError, match=r"input .*missing\.txt does not exist"):
        prepare([str(tmp_path / "missing.txt")], str(tmp_path / "o3"), "train:100", seq_len=SEQ_LEN)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"unsupported input .*x\.csv"):
        prepare([str(tmp_path / "x.csv")], str(tmp_path / "o4"), "train:100", seq_len=SEQ_LEN)
    assert not (tmp_path / "o1" / "manifest.json").exists()
