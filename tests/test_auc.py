"""The discriminator's AUC from fixed histograms (engine/auc.py): against an exact AUC over every pair of tokens,
within the binning's own bound; in the objective's forward, with no host sync."""

from __future__ import annotations

import pytest
import torch
from test_objective import make_batch, tiny_objective

from electra_scale.engine.auc import BINS, auc, auc_error_bound, probability_histograms
from electra_scale.engine.objective import summarize


def exact_auc(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> float | None:
    """Mann-Whitney over every (replaced, original) pair of real tokens, ties counted half: what tf.metrics.auc
    approximates with thresholds. Scores are the float32 sigmoid probabilities the histogram bins."""
    p = torch.sigmoid(logits.float()).double()
    real = weights > 0
    pos, neg = p[labels & real], p[~labels & real]
    if pos.numel() == 0 or neg.numel() == 0:
        return None
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def _tokens(n: int, replaced_frac: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    labels = torch.rand(n, generator=g) < replaced_frac
    weights = (torch.rand(n, generator=g) < 0.8).float()  # a fifth of the tokens are padding: weight 0
    return g, labels, weights


def _logits(kind: str, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    noise = torch.randn(labels.shape, generator=g)
    shift = labels.float()
    if kind == "separated":  # a discriminator that has learned something: AUC ~0.7
        return noise + 0.8 * shift
    if kind == "early":  # every probability within a few bins of 0.14: the worst case for binning
        return -1.8 + 0.02 * noise + 0.01 * shift
    if kind == "chance":
        return noise
    if kind == "ties":  # six distinct scores, every one shared by many tokens of both classes
        up = labels & (torch.rand(labels.shape, generator=g) < 0.5)
        return torch.randint(-2, 3, labels.shape, generator=g).float() + up.float()
    if kind == "saturated":  # sigmoid ~0 or exactly 1.0 in float32, replaced tokens more often at 1
        return torch.where(torch.rand(labels.shape, generator=g) < 0.3 + 0.4 * shift, 40.0, -40.0)
    if kind == "perfect":
        return torch.where(labels, 3.0, -3.0) + 0.1 * noise
    if kind == "reversed":
        return torch.where(labels, -3.0, 3.0) + 0.1 * noise
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["separated", "early", "chance", "ties", "saturated", "perfect", "reversed"])
@pytest.mark.parametrize("seed", [0, 1])
def test_auc_from_histograms_matches_the_exact_auc_within_the_binnings_bound(kind, seed):
    g, labels, weights = _tokens(4000, 0.15, seed)
    logits = _logits(kind, labels, g)
    hist = probability_histograms(logits, labels, weights)
    assert hist.shape == (2 * BINS,) and hist.dtype == torch.float64
    assert float(hist[:BINS].sum()) == float(weights[~labels].sum())  # every real token counted once
    assert float(hist[BINS:].sum()) == float(weights[labels].sum())
    exact, binned, bound = exact_auc(logits, labels, weights), auc(hist), auc_error_bound(hist)
    assert 0.0 <= binned <= 1.0
    assert abs(binned - exact) <= bound + 1e-12, (exact, binned, bound)
    if kind not in ("early", "saturated"):
        # The error measured on these draws: 2e-5 (separated), 6e-5 (chance), 0 where no two tokens of a bin
        # differ in score (ties, perfect, reversed); the bound is 6e-4 for the first two.
        assert abs(binned - exact) < 1e-4, (exact, binned)
    if kind == "ties":
        assert abs(binned - exact) < 1e-12  # a tie is half a pair in both
    if kind == "saturated":
        # All mass in the end bins, each holding one exact score: the binning loses nothing here either.
        assert abs(binned - exact) < 1e-12 and float(hist[BINS - 1] + hist[-1]) > 0
    if kind == "early":
        # Most pairs share a bin (bound 0.05), but their order within a bin is nearly a coin flip: measured
        # error 1.7e-3 and 3.8e-3.
        assert abs(binned - exact) < 0.01 < bound * 10


def test_auc_of_a_known_histogram_and_one_class_only():
    hist = torch.zeros(2 * BINS, dtype=torch.float64)
    hist[[10, 500]] = 1.0  # originals in bins 10 and 500
    hist[BINS + 500] = 2.0  # two replaced in bin 500: above one original, tied with the other
    assert auc(hist) == pytest.approx((2 * 1.0 + 2 * 0.5) / (2 * 2))
    assert auc(hist.tolist()) == auc(hist)  # summarize receives the all-reduced histogram as a list
    assert auc_error_bound(hist) == pytest.approx(0.5 * 2 / 4)
    g, labels, weights = _tokens(500, 0.15, 3)
    logits = _logits("separated", labels, g)
    for only in (torch.zeros_like(labels), torch.ones_like(labels)):  # no replaced / no original token
        assert exact_auc(logits, only, weights) is None
        assert auc(probability_histograms(logits, only, weights)) is None
    assert auc(torch.zeros(2 * BINS)) is None


def test_summarize_reports_disc_auc():
    g, labels, weights = _tokens(2000, 0.15, 5)
    logits = _logits("separated", labels, g)
    hist = probability_histograms(logits, labels, weights)
    sums = {k: 1.0 for k in ("gen_loss", "gen_correct", "n_masked", "disc_loss", "disc_correct", "n_tokens")}
    sums |= {"disc_tp": 0.0, "disc_pred_pos": 0.0, "n_replaced": 1.0, "disc_hist": (hist + hist).tolist()}
    assert summarize(sums, 50.0)["disc_auc"] == pytest.approx(auc(hist), abs=1e-15)  # a sum of windows: same AUC


SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::item", "aten::unique")


def test_the_objectives_forward_makes_no_host_sync():
    """The histograms are built into a zeros tensor of fixed size: torch.profiler sees no op that reads a device
    value back (scripts/step_profile.py counts the same ops), and the forward does return them."""
    from torch.profiler import ProfilerActivity, profile

    obj = tiny_objective()
    ids, attn = make_batch(4, 128, seed=9)
    args = (ids, attn, torch.zeros_like(ids), torch.arange(4))
    obj(*args)  # warm: lazy initialisation is not the step's
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = obj(*args)
    names = [e.name for e in prof.events()]
    assert "aten::index_add_" in names  # the histogram was built inside the profiled forward
    assert [n for n in names if n in SYNC_OPS] == []
    assert out["disc_hist"].shape == (2 * BINS,) and float(out["disc_hist"].sum()) == float(attn.sum())
