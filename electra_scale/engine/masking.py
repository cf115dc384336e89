"""Which positions an objective masks, and every random number it draws.

Follows google-research/electra (``pretrain/pretrain_helpers.py``: ``mask`` and ``_get_candidates_mask``):
per example, ``num_to_predict = max(1, min(N, round(num_tokens * mask_prob)))`` positions with
``N = int((mask_prob + 0.005) * seq_len)``; never [CLS], [SEP], [MASK] or padding. Of those, 85% become
[MASK] and 15% keep their token; no random replacement (the MLM baseline's ``random_token_prob`` adds them).
``objective.whole_word_mask`` masks whole words instead (``whole_word_positions``), as BERT's later release did.

Where this differs from the reference (positions drawn without replacement; randomness keyed to each example,
not to a device RNG stream), and why: engine/objective.py's docstring.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from electra_scale.config import ObjectiveConfig

# ------------------------------------------------------------------------------------------ randomness
# Every random number of the objective is a hash of (train seed, the example's stream position, which slot),
# computed for the whole micro-batch at once with integer ops on the device: the same numbers on CPU and GPU,
# whatever the batch or world size, in about 40 small kernels per micro-batch instead of several per example.
# The hash is "lowbias32" (C. Wellons, hash-prospector), a 32-bit finaliser, on int64 tensors that hold
# 32-bit values.
_M32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """(x * c) mod 2^32 for x in [0, 2^32). A multiplier >= 2^31 is used as c - 2^32: the product's low 32
    bits are the same, and no int64 product overflows (|x * c| < 2^63)."""
    return (x * (c - (1 << 32) if c >= 1 << 31 else c)) & _M32


def hash32(x):
    """lowbias32 of a tensor of 32-bit values (int64), or of a Python int."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def example_keys(seed: int, positions: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per example [B] (int64), from the train seed and its stream position."""
    p = positions.long()
    s = hash32((seed & _M32) ^ hash32((seed >> 32) & _M32))
    return hash32(hash32((p & _M32) ^ s) ^ (p >> 32))


@functools.lru_cache(maxsize=16)
def _slots(n: int, device: torch.device) -> torch.Tensor:
    return hash32(torch.arange(1, n + 1, device=device))


def random_bits(keys: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n] independent 32-bit integers (int64): slots 0..n-1 of each example."""
    return hash32(keys[:, None] ^ _slots(n, keys.device)[None, :])


def to_uniform(bits: torch.Tensor) -> torch.Tensor:
    """32-bit integers -> float32 uniforms in [0, 1) on a grid of 2^-24 (exact in float32)."""
    return (bits >> 8).float() * 2.0**-24


@dataclass
class Draws:
    """Every random number one micro-batch needs, drawn in one go."""

    order: torch.Tensor  # [B, L] 32-bit integers: the order in which positions are picked for masking
    kind: torch.Tensor  # [B, N] uniforms: a masked position becomes [MASK], keeps its token, or a random one
    token: torch.Tensor  # [B, N] 32-bit integers: that random token (the MLM baseline's 10%)
    sample: torch.Tensor  # [B, N] uniforms: the generator's sample at each masked position


def draw(seed: int, positions: torch.Tensor, seq_len: int, n: int) -> Draws:
    bits = random_bits(example_keys(seed, positions), seq_len + 3 * n)
    order, kind, token, sample = bits.split([seq_len, n, n, n], dim=1)
    return Draws(order, to_uniform(kind), token, to_uniform(sample))


def max_predictions(mask_prob: float, seq_len: int) -> int:
    """The reference's ``max_predictions_per_seq``: the cap on masked positions per example."""
    return int((mask_prob + 0.005) * seq_len)


def candidate_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, special: dict[str, int]) -> torch.Tensor:
    """Positions that may be masked: real tokens other than [CLS], [SEP] and [MASK]."""
    ok = attention_mask.bool()
    for name in ("cls", "sep", "mask", "pad"):
        ok &= input_ids != special[name]
    return ok


def predictions_for(n_tokens: torch.Tensor, candidates: torch.Tensor, mask_prob: float, seq_len: int) -> torch.Tensor:
    """Masked positions per example from its token and maskable-token counts, [B]."""
    cap = max_predictions(mask_prob, seq_len)
    n = torch.round(n_tokens.to(torch.float64) * mask_prob).clamp(1, cap).long()  # round-half-even, as tf.round
    return torch.minimum(n, candidates.to(n.device).long())


def num_to_predict(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, special: dict[str, int], mask_prob: float
) -> torch.Tensor:
    """Masked positions per example, [B]. Deterministic from the tokens, so the train loop can count the
    global batch's targets before the forward pass."""
    candidates = candidate_mask(input_ids, attention_mask, special).sum(-1)
    return predictions_for(attention_mask.sum(-1), candidates, mask_prob, input_ids.shape[1])


def count_targets(batch_ids: torch.Tensor, attention_mask: torch.Tensor, special: dict, mask_prob: float):
    """(masked positions, non-padding tokens) of a micro-batch: the loss denominators."""
    n_masked = int(num_to_predict(batch_ids, attention_mask, special, mask_prob).sum())
    return n_masked, int(attention_mask.sum())


def count_batch_targets(mb, mask_prob: float) -> tuple[int, int]:
    """``count_targets`` of a data/stream.py ``MicroBatch`` from its per-example counts: no pass over the
    tokens, and nothing on the device."""
    n = predictions_for(mb.lengths, mb.candidates, mask_prob, mb.tokens.shape[1])
    return int(n.sum()), int(mb.lengths.sum())


@dataclass
class Masked:
    input_ids: torch.Tensor  # [B, L] what the generator (or MLM) sees
    positions: torch.Tensor  # [B, N] masked positions (0 where unused)
    weights: torch.Tensor  # [B, N] 1.0 for a real masked position, 0.0 for padding of the list
    targets: torch.Tensor  # [B, N] original token ids at the positions


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    special: dict[str, int],
    cfg: ObjectiveConfig,
    vocab_size: int,
    draws: Draws,
    continuation: torch.Tensor | None = None,
) -> Masked:
    """Pick the positions to predict and write [MASK] (or a random token) there. ``continuation``: a [V] bool
    table of the pieces that continue a word (data/words.py), for whole-word masking; None masks single tokens."""
    B, L = input_ids.shape
    device = input_ids.device
    N = max_predictions(cfg.mask_prob, L)
    n = num_to_predict(input_ids, attention_mask, special, cfg.mask_prob).to(device)
    candidates = candidate_mask(input_ids, attention_mask, special)
    if continuation is not None:
        positions, n = whole_word_positions(input_ids, candidates, continuation, draws.order, n, N)
    else:
        # A random 32-bit score per token, made unique by the position in its low bits (so that no tie can be
        # broken differently on another device); non-candidates pushed past every score. The N smallest are a
        # uniform sample without replacement from the candidates; the first n[b] of them are used.
        scores = (draws.order << 12) | torch.arange(L, device=device)
        scores = scores.masked_fill(~candidates, 1 << 62)
        positions = scores.topk(N, dim=-1, largest=False).indices
    weights = torch.arange(N, device=device)[None, :] < n[:, None]
    positions = positions * weights  # unused slots point at [CLS] with weight 0, as in the reference
    targets = input_ids.gather(1, positions)

    u = draws.kind
    to_mask = weights & (u < cfg.mask_token_prob)
    to_random = weights & (u >= cfg.mask_token_prob) & (u < cfg.mask_token_prob + cfg.random_token_prob)
    new_tokens = torch.where(to_mask, torch.full_like(targets, special["mask"]), targets)
    if cfg.random_token_prob > 0:
        new_tokens = torch.where(to_random, draws.token % vocab_size, new_tokens)
    masked_ids = input_ids.scatter(1, positions, torch.where(weights, new_tokens, targets))
    return Masked(masked_ids, positions, weights.float(), targets)


def whole_word_positions(input_ids, candidates, continuation, order, n, N: int):
    """Whole-word masking, as BERT's ``create_pretraining_data.py --do_whole_word_mask``: a word (a piece and
    the continuations after it: ``##`` pieces, or pieces without a ``▁``/``Ġ`` word mark) is masked whole or not
    at all. Words are taken in a random order (each
    word's score is its first piece's random number) until the next one would pass the example's budget n[b];
    the budget and the cap N stay the reference's. Returns the positions [B, N] (a word's pieces next to each
    other) and the number used per example [B], which can fall short of n[b] by less than one word (BERT
    skips a word that does not fit and tries the next; taking a prefix keeps this a few tensor ops).
    Everything stays on the device: the count feeds the loss denominators without a host sync."""
    B, L = input_ids.shape
    device = input_ids.device
    pos = torch.arange(L, device=device).expand(B, L)
    # A word starts at a candidate that is not a continuation, or whose previous token is not a candidate
    # (a ## piece right after [CLS] starts its own word).
    cont = continuation[input_ids] & candidates
    prev_candidate = F.pad(candidates[:, :-1], (1, 0), value=False)
    starts = candidates & ~(cont & prev_candidate)
    start_of = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values  # each token's word start
    word_score = order.gather(1, start_of)
    # Sort key: the word's score, then its start (unique per word), then the position: a word's pieces are
    # adjacent and in order, and no tie is left to the device.
    key = (word_score << 24) | (start_of << 12) | pos
    key = key.masked_fill(~candidates, 1 << 62)
    positions = key.topk(N, dim=-1, largest=False).indices  # [B, N]
    # Word lengths, counted at the word's start, read back at each picked token.
    length = torch.zeros_like(pos).scatter_add_(1, start_of, candidates.long())
    picked_start = start_of.gather(1, positions)
    word_len = length.gather(1, picked_start)
    rank = torch.arange(N, device=device).expand(B, N)
    first_in_list = rank - (positions - picked_start)  # where the picked token's word begins in the list
    fits = (first_in_list + word_len <= n[:, None]) & candidates.gather(1, positions)
    # Words fit in order, so the fitting ones are a prefix of the list: their count is the number used.
    used = fits.long().cumprod(dim=1).sum(dim=1)
    return positions, used


def draw_and_mask(
    objective, input_ids, attention_mask, positions, vocab_size: int, seed: int | None = None
) -> tuple[Draws, Masked]:
    """The micro-batch's random numbers (keyed by ``objective.seed``, or ``seed`` when given, and each example's
    stream position) and its masking, as both objectives start."""
    L, N = input_ids.shape[1], max_predictions(objective.cfg.mask_prob, input_ids.shape[1])
    key = objective.seed if seed is None else seed
    draws = draw(key, positions.to(input_ids.device), L, N)
    continuation = objective.continuation if objective.cfg.whole_word_mask else None
    return draws, mask_tokens(
        input_ids, attention_mask, objective.special, objective.cfg, vocab_size, draws, continuation
    )
