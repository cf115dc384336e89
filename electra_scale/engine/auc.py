"""The discriminator's AUC, as google-research/electra logs it (``run_pretraining.py``: ``tf.metrics.auc`` over
the sigmoid probabilities, weighted by the input mask), without a host sync.

An exact AUC needs every token's score at once, and a sort. Instead each micro-batch adds its tokens to a fixed
histogram of ``BINS`` equal bins over [0, 1], one for original and one for replaced tokens, with ``index_add_``
into a zeros tensor of fixed size: no data-dependent shape, so nothing waits for the device (``bincount`` and
``histc`` size or range their output from the data, which on CUDA reads it back). The train loop sums the
histograms like any other metric sum, over micro-batches, steps and ranks, and ``auc`` turns the sum into one
number at logging steps.

Counts are float64: whole numbers stay exact up to 2^53 tokens, so summing in any order (micro-batches, ranks)
gives the same histogram, and 2 ranks give what 1 rank gives.

The reference's ``tf.metrics.auc`` takes 200 thresholds and the trapezoid rule; 1,024 bins is the same method
with finer thresholds. The only error against an exact rank-based AUC comes from a replaced and an original token
in the same bin, which count half whatever their order: at most half the share of such pairs (``auc_error_bound``).
"""

from __future__ import annotations

import torch

BINS = 1024


@torch.no_grad()
def probability_histograms(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[2 * BINS] float64: the weight of original tokens in each probability bin, then that of replaced ones.
    ``logits``, ``labels`` (bool, True = replaced) and ``weights`` (1.0 for a real token, 0.0 for padding) have
    one entry per token, in any layout (padded [B, L] or packed [T]): padding adds zero, so both give the same."""
    p = torch.sigmoid(logits.detach().float())
    # p * 1024 is exact in float32; a saturated sigmoid (p == 1.0) belongs to the top bin.
    index = (p * BINS).long().clamp_(0, BINS - 1) + BINS * labels.long()
    hist = torch.zeros(2 * BINS, dtype=torch.float64, device=logits.device)
    return hist.index_add_(0, index.flatten(), weights.detach().flatten().to(torch.float64))


def _split(hist) -> tuple[torch.Tensor, torch.Tensor]:
    h = torch.as_tensor(hist, dtype=torch.float64).reshape(2, -1)
    return h[0], h[1]


def auc(hist) -> float | None:
    """The area under the ROC curve from summed histograms (a tensor or a list of 2 * BINS numbers): the chance
    that a replaced token scores above an original one, a pair in the same bin counting half (Mann-Whitney's U
    over the bins, which is the trapezoid rule over the ROC points at the bin edges). None when either class is
    empty: the curve is undefined then (``tf.metrics.auc`` would report 0)."""
    original, replaced = _split(hist)
    n_orig, n_repl = float(original.sum()), float(replaced.sum())
    if n_orig <= 0 or n_repl <= 0:
        return None
    below = original.cumsum(0) - original  # originals in strictly lower bins
    return float((replaced * (below + 0.5 * original)).sum()) / (n_orig * n_repl)


def auc_error_bound(hist) -> float:
    """The most ``auc`` can differ from the exact AUC of the same tokens: half the share of (replaced, original)
    pairs that share a bin, whose true order the histogram cannot see (tied scores are counted half by both)."""
    original, replaced = _split(hist)
    pairs = float(original.sum()) * float(replaced.sum())
    return 0.5 * float((original * replaced).sum()) / pairs if pairs > 0 else 0.0
