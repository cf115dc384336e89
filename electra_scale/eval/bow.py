"""The bag-of-words reference line: a tf-idf logistic regression on the same labelled examples as the models
(the same ``--per-class`` / ``--train-limit`` draw per seed), so a reader sees what a transformer has to beat.

Words are lowercased runs of letters and digits; the vocabulary is the seed's training texts' words (the most
frequent ``MAX_WORDS``), with sublinear tf (1 + log count), smoothed idf from the same texts, and unit-length
rows. The L2 strength is picked on dev, as the probe's is, with the same L-BFGS fit (finetune/probe.py).
Plain torch and numpy: no new dependency."""

from __future__ import annotations

import re
import time
from collections import Counter

import numpy as np

from electra_scale.eval.tasks import TaskData

# The seed's 2,000 most frequent words: wiki_topic at K = 32, test accuracy 69-75 (two seeds) against 72-77 with
# 5,000, at 40% of the fitting time (1.1 s a seed on one core).
MAX_WORDS = 2000
BOW_L2 = (1e-4, 1e-3, 1e-2)  # tf-idf rows have unit length: weak penalties (the probe's grid tops out too strong)
_WORD = re.compile(r"[^\W_]+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _tfidf(docs: list[list[str]], index: dict[str, int], idf: np.ndarray):
    import torch

    x = np.zeros((len(docs), len(index)), np.float64)
    for i, words in enumerate(docs):
        for w, c in Counter(words).items():
            j = index.get(w)
            if j is not None:
                x[i, j] = 1.0 + np.log(c)
    x *= idf
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return torch.from_numpy(x)


def bow_seed(task: TaskData, train_idx: np.ndarray, seed: int) -> dict:
    """One seed's reference: scores on dev (and test) of the L2 strength best on dev."""
    from electra_scale.eval.finetune.probe import _design, _fit_linear
    from electra_scale.eval.tasks import score

    started = time.perf_counter()
    train = [_words(task.splits["train"][i].text_a) for i in train_idx]
    df = Counter(w for words in train for w in set(words))
    vocab = [w for w, _ in sorted(df.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_WORDS]]
    index = {w: j for j, w in enumerate(vocab)}
    idf = np.log((1 + len(train)) / (1 + np.array([df[w] for w in vocab], np.float64))) + 1.0
    y_train = task.label_ids(task.splits["train"])[train_idx]
    x_train = _tfidf(train, index, idf)
    evals = {s: _tfidf([_words(e.text_a) for e in ex], index, idf) for s, ex in task.splits.items() if s != "train"}
    import torch

    candidates = []
    for l2 in BOW_L2:
        w = _fit_linear(x_train, torch.from_numpy(y_train), l2, len(task.labels), seed)
        candidates.append(
            {
                "l2": l2,
                **{
                    s: score(task, task.label_ids(task.splits[s]), (_design(x) @ w).argmax(-1).numpy())
                    for s, x in evals.items()
                },
            }
        )
    best = max(candidates, key=lambda c: (c["dev"][task.main_metric], c["l2"]))
    return {"seed": seed, **best, "wall_s": round(time.perf_counter() - started, 2)}


def bow_reference(task: TaskData, subsets: dict[int, np.ndarray]) -> dict | None:
    """Per-seed scores of the bag-of-words model on each seed's examples (None for regression or text pairs)."""
    if task.regression or task.splits["train"][0].text_b is not None:
        return None
    runs = [bow_seed(task, idx, seed) for seed, idx in subsets.items()]
    return {"runs": runs}
