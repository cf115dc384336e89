"""The few-label evaluation's parts: the paired statistics on hand-computed numbers, the per-class draw, and the
wiki_topic task, whose dev and test articles a real ``prepare --eval-fraction`` never trains on."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from electra_scale.eval.draw import training_subset
from electra_scale.eval.stats import one_class_seeds, paired, verdict


def test_paired_statistics_on_known_numbers():
    # Differences 0.06, 0.04, 0.08, 0.06 -> 6, 4, 8, 6 points: mean 6, sample std sqrt(8/3), SE sqrt(8/3)/2.
    a, b = [0.56, 0.54, 0.58, 0.56], [0.50, 0.50, 0.50, 0.50]
    p = paired(a, b)
    assert p.n == 4 and p.mean == pytest.approx(6.0) and p.se == pytest.approx(math.sqrt(8 / 3) / 2)
    assert p.se == pytest.approx(0.8165, abs=1e-4)
    assert verdict(p, "pretrained", "random init") == (
        "pretrained better than random init by 6.0 ± 0.8 points (paired SE, 4 seeds)"
    )
    assert verdict(paired(b, a), "pretrained", "random init").startswith("random init better than pretrained by 6.0")
    # Differences +2, -1, +2, -1 points: mean 0.5, sample variance 3, SE sqrt(3)/2 = 0.87, under 2 SE.
    q = paired([0.52, 0.49, 0.52, 0.49], [0.5] * 4)
    assert q.mean == pytest.approx(0.5) and q.se == pytest.approx(math.sqrt(3) / 2) and not q.measurable
    line = "no measurable difference between ELECTRA and MLM (+0.5 ± 0.9 points, paired SE, 4 seeds)"
    assert verdict(q, "ELECTRA", "MLM") == line
    # 1 SE is not measurable, 4 SE is; one seed has no SE; unequal seeds are refused.
    assert not paired([0.04, 0.0], [0.0, 0.0]).measurable  # diffs 4, 0: mean 2, SE 2
    r = paired([0.05, 0.03], [0.0, 0.0])  # diffs 5, 3: mean 4, SE 1
    assert r.mean == pytest.approx(4.0) and r.se == pytest.approx(1.0) and r.measurable
    assert "no paired SE from one seed" in verdict(paired([0.6], [0.5]), "a", "b")
    with pytest.raises(ValueError, match="same seeds"):
        paired([0.5, 0.6], [0.5])
    runs = [{"one_class": True}, {"one_class": False}, {"one_class": True}, {}]
    assert one_class_seeds(runs) == 2


def test_the_per_class_draw_depends_on_the_seed_and_the_task_only():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 5)
    draws = {seed: training_subset(labels, len(labels), seed, None, 4) for seed in range(6)}
    for seed, idx in draws.items():
        assert np.array_equal(idx, training_subset(labels, len(labels), seed, None, 4))  # any caller, any model
        assert np.array_equal(np.bincount(labels[idx]), [4, 4, 4]) and np.all(np.diff(idx) > 0)
    assert len({tuple(idx) for idx in draws.values()}) == 6  # other seeds, other labels
    # A class with fewer than K examples gives all it has; no draw takes the same example twice.
    assert np.bincount(labels[training_subset(labels, len(labels), 0, None, 8)]).tolist() == [8, 8, 5]
    assert np.array_equal(training_subset(labels, len(labels), 3, None, None), np.arange(len(labels)))


def test_wiki_topic_never_evaluates_on_a_pretraining_document(tmp_path):
    """Run prepare --eval-fraction on 591 (every 17th) of the demo corpus's articles; no dev or test article of
    wiki_topic may appear in the training shards (its first sentence's token ids, searched in every training
    example), while the training pool's articles do; Uncategorized articles are never labels."""
    from electra_scale.data import prepare
    from electra_scale.data.shards import load_manifest, read_shard
    from electra_scale.data.tokenizer import load_tokenizer
    from electra_scale.data.units import iter_corpus
    from electra_scale.data.wiki import fetch_corpus
    from electra_scale.eval.finetune import DEFAULT_CACHE
    from electra_scale.eval.wiki_topic import UNLABELLED, article_topics, wiki_topic_task

    work = DEFAULT_CACHE
    full, topics = fetch_corpus(work), article_topics(work)
    assert len(topics) == 10033 and len({t for _, t in topics} - {UNLABELLED}) == 11
    corpus = tmp_path / "wiki591.jsonl"
    corpus.write_text("".join(full.read_text().splitlines(keepends=True)[::17]))  # the file goes topic by topic
    task = wiki_topic_task(corpus, topics[::17], 0.1)
    assert UNLABELLED not in task.labels and len(task.labels) == 11
    sizes = {k: len(v) for k, v in task.splits.items()}
    assert sizes["dev"] + sizes["test"] >= 30 and sizes["dev"] > 0 and sizes["test"] > 0 and sizes["train"] > 400

    out = str(tmp_path / "shards")
    prepare([str(corpus)], out, "train:1000", seq_len=128, samples_per_shard=256, progress=False, eval_fraction=0.1)
    tok = load_tokenizer(f"{out}/tokenizer.json", lowercase=load_manifest(out).lowercase)

    def examples(prefix: str) -> list[bytes]:
        m = load_manifest(prefix)
        return [np.asarray(e, np.int64).tobytes() for i in range(len(m.shards)) for e in read_shard(prefix, m, i)]

    training, held = examples(out), examples(f"{out}/eval")
    lines = corpus.read_text().splitlines()
    first = {json.loads(line)["text"]: doc[0] for line, doc in zip(lines, iter_corpus([str(corpus)]))}

    def found(text: str, examples: list[bytes]) -> bool:
        ids = tok.encode(first[text], add_special_tokens=False).ids[:12]
        needle = np.asarray(ids, np.int64).tobytes()
        return len(ids) >= 4 and any(
            needle in e for e in examples
        )  # the article's opening words, as prepare encoded them

    for split in ("dev", "test"):
        for e in task.splits[split]:
            assert not found(e.text_a, training), (split, e.text_a[:60])
    assert sum(found(e.text_a, held) for s in ("dev", "test") for e in task.splits[s]) >= 0.9 * (
        sizes["dev"] + sizes["test"]
    )
    assert sum(found(e.text_a, training) for e in task.splits["train"][:100]) >= 90
