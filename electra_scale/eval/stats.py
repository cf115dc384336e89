"""Paired statistics for comparing models seed by seed, used wherever models are compared (``finetune
--paired-with``, ``compare``'s report, the demo).

Seed ``s`` gives every model the same labelled examples (the same ``--per-class`` draw) and the same probe or
fine-tuning settings, so the per-seed scores of two models are paired: their differences cancel what the draw
of labels does to both (which is most of the spread at a few labels per class). The standard error of the mean
difference is then the honest error bar of "A - B", far smaller than the two unpaired spreads suggest.

A difference counts as measurable when it is at least 2 standard errors (about a 95% two-sided level for the
seed counts used here); the words say so, so a reader never has to do the arithmetic."""

from __future__ import annotations

import math
from dataclasses import dataclass

# |mean| below this many standard errors reads "no measurable difference".
MEASURABLE_SE = 2.0


@dataclass(frozen=True)
class Paired:
    """``a - b`` per seed, in the unit given (points = 100 x accuracy)."""

    mean: float
    se: float | None  # None for one seed: no spread to estimate
    n: int
    diffs: tuple[float, ...]

    @property
    def measurable(self) -> bool:
        return self.se is not None and abs(self.mean) >= MEASURABLE_SE * self.se and self.mean != 0.0

    def to_dict(self) -> dict:
        return {"mean": self.mean, "se": self.se, "n": self.n, "diffs": list(self.diffs)}


def paired(a: list[float], b: list[float], scale: float = 100.0) -> Paired:
    """The mean of ``a[i] - b[i]`` (times ``scale``: accuracies in points) and its standard error,
    ``sample std / sqrt(n)`` (ddof=1)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired scores need the same seeds for both models ({len(a)} vs {len(b)})")
    diffs = tuple(scale * (x - y) for x, y in zip(a, b))
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return Paired(mean, None, n, diffs)
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return Paired(mean, math.sqrt(var / n), n, diffs)


def verdict(p: Paired, a: str, b: str) -> str:
    """In words: "pretrained better by 5.8 ± 1.5 points (paired SE, 8 seeds)" or "no measurable difference
    (+0.7 ± 1.4 points, paired SE, 8 seeds)"; one seed has no SE and says so."""
    seeds = f"{p.n} seed{'s' if p.n != 1 else ''}"
    if p.se is None:
        return f"{a} - {b}: {p.mean:+.1f} points on {seeds} (no paired SE from one seed: run more seeds)"
    if not p.measurable:
        return f"no measurable difference between {a} and {b} ({p.mean:+.1f} ± {p.se:.1f} points, paired SE, {seeds})"
    better, worse = (a, b) if p.mean > 0 else (b, a)
    return f"{better} better than {worse} by {abs(p.mean):.1f} ± {p.se:.1f} points (paired SE, {seeds})"


def one_class_seeds(runs: list[dict]) -> int:
    """How many seeds' models predict a single class for every example of the reported split (the collapse to
    the majority class a few labels can cause): ``runs`` carry ``one_class`` (finetune/probe runs do)."""
    return sum(bool(r.get("one_class")) for r in runs)


def mean_se(values: list[float], scale: float = 100.0) -> tuple[float, float | None]:
    """Mean and standard error of one model's per-seed scores (for the reference lines)."""
    xs = [scale * v for v in values]
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def fmt_mean_se(values: list[float]) -> str:
    m, se = mean_se(values)
    return f"{m:.1f}" + ("" if se is None else f" ± {se:.1f}")
