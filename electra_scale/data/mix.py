"""Which source each stream position draws from, when a run mixes several shard sets (``data.sources``).

The stream of a run (data/stream.py) is ``P`` lanes: global position ``g`` is example ``j = g // P`` of lane
``p = g % P``, and rank ``r`` of ``W`` trains lane ``p`` iff ``p % W == r``. Mixing keeps that shape: every
source is cut into the same ``P`` partitions, and lane ``p`` of the mixed stream is a merge of partition ``p``
of each source. So rank ``r`` reads only its own partitions of every source, whatever ``W`` is.

**The merge.** Position ``g`` draws from the source whose share of ``[0, M)`` holds

    u(g) = (g * A + C) mod M,    M = F(44) = 701,408,733,  A = F(43),  C from the train seed,

where ``F`` are Fibonacci numbers: ``A / M`` is the best rational stand-in for the golden ratio, and the points
``g * A mod M`` are the one-dimensional Fibonacci lattice, the sequence whose every run of ``n`` consecutive
points fills each interval of ``[0, M)`` within ``O(log n)`` of its length. Source ``k`` owns the interval
``[L_k, L_{k+1})``, ``L_k = round(M * (w_0 + ... + w_{k-1}) / sum(w))``. A global batch is a run of ``GB``
consecutive positions, so it takes its sources in the weights' proportions up to a couple of examples; a lane
is the lattice with step ``P * A``, which spreads its draws less evenly but still closely: each source within 70
examples of its share at every point of 200,000 draws, for every ``P`` from 1 to 128 and 192 ... 4,096 that we
measured (a window holds thousands of examples, so the lanes of a rank stay in step).

**Counting.** The ``i``-th draw of source ``k`` in lane ``p`` is example ``i`` of that source's partition ``p``
(its own epochs, its own reshuffles: ``i // Q_k`` is the source's epoch in that lane). Resuming needs, for each
of a rank's lanes, how often each source was drawn before the resumed position: a count of lattice points in an
interval, which ``floor_sum`` gives exactly in ``O(log M)`` integer steps, with no replay of earlier steps.

This depends on nothing but the weights, ``P`` and the seed: not on ``W``, the micro-batch size or the workers.
"""

from __future__ import annotations

import numpy as np

M = 701_408_733  # F(44): the lattice's size (its period along a lane, ~7e8 examples)
A = 433_494_437  # F(43): A / M has the golden ratio's continued fraction [0; 1, 1, 1, ...]


def floor_sum(n: int, m: int, a: int, b: int) -> int:
    """sum(floor((a * i + b) / m) for i in range(n)), exactly, for n >= 0, m >= 1, a >= 0, b >= 0.

    Euclid's reduction: take the whole parts of ``a / m`` and ``b / m`` out as closed forms, then count the
    lattice points under the remaining line by swapping the axes (the line ``y = (a x + b) / m`` seen from the
    y-axis has slope ``m / a``), which shrinks ``(m, a)`` like the Euclidean algorithm."""
    total = 0
    while n > 0:
        if a >= m:
            total += (a // m) * n * (n - 1) // 2
            a %= m
        if b >= m:
            total += (b // m) * n
            b %= m
        top = a * n + b  # the line's value at x = n, times m
        if top < m:
            break
        # What is left counts the lattice points under the line from the other axis: top // m rows, and the
        # count of each row is again a floor of a line, with (n, m, a, b) = (top // m, a, m, top % m).
        n, b, m, a = top // m, top % m, a, m
    return total


class SourceMix:
    """The merge of ``weights``' sources over ``partitions`` lanes (see the module docstring)."""

    def __init__(self, weights: list[float], partitions: int, seed: int):
        if not weights or any(not w > 0 for w in weights):
            raise ValueError(f"source weights must be positive, got {weights}")
        if partitions < 1:
            raise ValueError("partitions must be >= 1")
        self.weights = [float(w) / sum(weights) for w in weights]
        self.partitions = partitions
        cum = np.concatenate([[0.0], np.cumsum(self.weights)])
        bounds = [round(M * float(c)) for c in cum]
        bounds[-1] = M
        for k in range(1, len(bounds)):  # a tiny weight still owns at least one point of the lattice
            bounds[k] = max(bounds[k], bounds[k - 1] + 1)
        self.bounds = bounds  # source k owns [bounds[k], bounds[k + 1])
        self.phase = int(np.random.default_rng([seed, 0x4D4958]).integers(M)) if len(weights) > 1 else 0

    @property
    def num_sources(self) -> int:
        return len(self.weights)

    def sources(self, positions: np.ndarray) -> np.ndarray:
        """The source index of each global stream position."""
        if self.num_sources == 1:
            return np.zeros(len(positions), dtype=np.int64)
        u = ((positions % M) * A + self.phase) % M  # < 2^30 * 2^29: no int64 overflow
        return np.searchsorted(self.bounds, u, side="right") - 1

    def _counts(self, n: int, step: int, start: int) -> list[int]:
        """How many of the lattice points ``(start + i * step) mod M``, ``i < n``, each source owns.
        floor((x) / M) - floor((x - L) / M) is 1 exactly when x mod M is below L."""
        if self.num_sources == 1:
            return [n]
        a, b = step % M, (start + self.phase) % M
        base = floor_sum(n, M, a, b)
        below = [base - floor_sum(n, M, a, b - bound + M) + n for bound in self.bounds]
        return [below[k + 1] - below[k] for k in range(self.num_sources)]

    def lane_counts(self, lane: int, j: int) -> list[int]:
        """How many of the first ``j`` cells of ``lane`` (positions ``lane + i * P``) each source owns."""
        return self._counts(j, self.partitions * A, lane * A)

    def cells_before(self, lane: int, position: int) -> int:
        """How many cells of ``lane`` lie before global position ``position``."""
        return max(0, -(-(position - lane) // self.partitions))

    def totals(self, position: int) -> list[int]:
        """Each source's draws among global positions ``[0, position)``."""
        return self._counts(position, A, 0)


class LaneCursor:
    """One rank's walk through the mix: for each of its lanes, how often each source has been drawn so far, so
    that each position it trains maps to its source and to its index in that source's own stream."""

    def __init__(self, mix: SourceMix, rank: int, world_size: int, first_position: int):
        self.mix, self.partitions = mix, mix.partitions
        self.lanes = np.arange(rank, mix.partitions, world_size)
        self.next = np.zeros((mix.num_sources, mix.partitions), dtype=np.int64)  # [source, lane] draws so far
        for lane in self.lanes.tolist():
            self.next[:, lane] = mix.lane_counts(lane, mix.cells_before(lane, first_position))

    def advance(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, index in the source's lane) of each of ``positions`` (increasing, this rank's, the next ones
        it trains), and count them as drawn."""
        lane = positions % self.partitions
        src = self.mix.sources(positions)
        if self.mix.num_sources == 1:  # the lane index is the cell's: j
            index = positions // self.partitions
            self.next[0, lane] = index + 1
            return src, index
        # Earlier draws of the same source in the same lane within these positions: a per-(source, lane) running
        # count, from one stable sort (positions of one lane are in increasing j already).
        key = src * self.partitions + lane
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
        first = np.flatnonzero(np.concatenate([[True], sorted_key[1:] != sorted_key[:-1]]))
        run = np.arange(len(key)) - np.repeat(first, np.diff(np.concatenate([first, [len(key)]])))
        within = np.empty(len(key), dtype=np.int64)
        within[order] = run
        index = self.next[src, lane] + within
        np.add.at(self.next, (src, lane), 1)
        return src, index

    def done(self, source: int) -> int:
        """The fewest draws of ``source`` in any of this rank's lanes: every example of the source's lanes before
        this lane index has been trained."""
        return int(self.next[source, self.lanes].min())
