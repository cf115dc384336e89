"""Which labelled training examples a seed uses: all of them, ``train_limit`` drawn at random, or ``per_class`` K
of each class (the few-label setting).

The draw is a function of the seed and the task's training split only (never of the model), so every model
evaluated at seed ``s`` learns from the same examples, and models can be compared seed by seed
(eval/stats.py); different seeds draw different examples, so the spread over seeds includes the luck of the
labels."""

from __future__ import annotations

import hashlib
import logging

import numpy as np

from electra_scale.data.shards import DataError

log = logging.getLogger("electra_scale")


def training_subset(
    labels: np.ndarray | None, n: int, seed: int, limit: int | None, per_class: int | None
) -> np.ndarray:
    """Sorted indices into the training split. ``labels``: the training split's class ids (None for regression,
    where ``per_class`` does not apply)."""
    if per_class is not None:
        if labels is None:
            raise DataError("--per-class draws K examples of each class: it needs a classification task")
        # Its own stream ([seed, 2]): the draw of --train-limit ([seed, 0]) and the data order ([seed, 1]) are
        # unchanged by it.
        rng = np.random.default_rng([seed, 2])
        picked = []
        for c in range(int(labels.max()) + 1):
            members = np.flatnonzero(labels == c)
            if len(members) == 0:
                continue
            if len(members) < per_class:
                log.warning("class %d has %d training examples, fewer than --per-class %d", c, len(members), per_class)
            picked.append(rng.choice(members, size=min(per_class, len(members)), replace=False))
        return np.sort(np.concatenate(picked))
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 0]).choice(n, size=limit, replace=False))


def draw_digest(indices: np.ndarray) -> str:
    """A short fingerprint of a seed's examples, recorded in the results: equal across models at a seed."""
    return hashlib.sha256(np.asarray(indices, np.int64).tobytes()).hexdigest()[:16]
