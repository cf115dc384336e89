"""Replaced token detection (ELECTRA) and the masked-LM baseline, behind one interface.

Follows google-research/electra (``run_pretraining.py``, ``pretrain/pretrain_helpers.py``):

1. Mask: per example, ``num_to_predict = max(1, min(N, round(num_tokens * mask_prob)))`` positions with
   ``N = int((mask_prob + 0.005) * seq_len)``; never [CLS], [SEP], [MASK] or padding. Of those, 85% become
   [MASK] and 15% keep their token; no random replacement.
2. The generator (a small MLM) predicts the original token at the masked positions only: its vocabulary
   projection runs on the gathered positions, not the whole sequence. Loss: cross-entropy there.
3. Sample a replacement at every masked position from softmax(``logits / temperature``), without gradient
   and in fp32.
4. The discriminator sees the original sequence with the samples written in, and predicts per token whether
   it was replaced. A sample equal to the original counts as original. Loss: sigmoid cross-entropy over all
   non-padding tokens.
5. total = gen_loss + disc_weight (50) x disc_loss.

Where this differs from the reference, and why:
- Replacements are sampled by inverting the softmax's CDF rather than with Gumbel-max: the same
  distribution at about a quarter of the cost on CPU (see ``sample_tokens``).
- Masked positions are drawn *without* replacement (the reference's ``tf.random.categorical`` draws with
  replacement, so duplicates make it mask slightly fewer tokens than intended).
- Randomness is keyed to each example (train seed + the example's global stream position), not to a device
  RNG stream: the same global batch gets the same masks and samples whatever the number of ranks, which makes
  runs reproducible across world sizes and resumable on a different one. Dropout still uses torch's RNG.
- Losses are normalised by the counts of the whole *global* batch (masked positions, non-padding tokens)
  rather than per device, so 2 ranks x B equals 1 rank x 2B exactly. Identical to the reference whenever all
  devices hold the same number of targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from electra_scale.config import ObjectiveConfig

_MASK64 = (1 << 64) - 1


def example_seed(seed: int, position: int) -> int:
    """A well-mixed 63-bit seed for one example (splitmix64 of the train seed and its stream position)."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def example_generators(seed: int, positions: torch.Tensor, device: torch.device) -> list[torch.Generator]:
    gens = []
    for pos in positions.tolist():
        g = torch.Generator(device=device)
        g.manual_seed(example_seed(seed, pos))
        gens.append(g)
    return gens


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
    gens: list[torch.Generator],
) -> Masked:
    B, L = input_ids.shape
    device = input_ids.device
    N = max_predictions(cfg.mask_prob, L)
    n = num_to_predict(input_ids, attention_mask, special, cfg.mask_prob).to(device)
    # Uniform scores, non-candidates pushed past 1, ascending sort: the first n[b] are a uniform sample
    # without replacement from the candidates.
    scores = torch.stack([torch.rand(L, generator=g, device=device) for g in gens])
    scores = scores.masked_fill(~candidate_mask(input_ids, attention_mask, special), 2.0)
    positions = scores.argsort(dim=-1)[:, :N]
    weights = torch.arange(N, device=device)[None, :] < n[:, None]
    positions = positions * weights  # unused slots point at [CLS] with weight 0, as in the reference
    targets = input_ids.gather(1, positions)

    u = torch.stack([torch.rand(N, generator=g, device=device) for g in gens])
    to_mask = weights & (u < cfg.mask_token_prob)
    to_random = weights & (u >= cfg.mask_token_prob) & (u < cfg.mask_token_prob + cfg.random_token_prob)
    new_tokens = torch.where(to_mask, torch.full_like(targets, special["mask"]), targets)
    if cfg.random_token_prob > 0:
        rand_ids = torch.stack([torch.randint(vocab_size, (N,), generator=g, device=device) for g in gens])
        new_tokens = torch.where(to_random, rand_ids, new_tokens)
    masked_ids = input_ids.scatter(1, positions, torch.where(weights, new_tokens, targets))
    return Masked(masked_ids, positions, weights.float(), targets)


@torch.no_grad()
def sample_tokens(logits: torch.Tensor, temperature: float, gens: list[torch.Generator]) -> torch.Tensor:
    """One token per masked position from softmax(logits / T), drawn by inverting its CDF: cumulative sum of
    the probabilities, one uniform per position, binary search. Always fp32: a bf16/fp16 running sum over the
    vocabulary would be far too coarse.

    The reference draws the same distribution with Gumbel-max (argmax(logits + Gumbel noise)), which needs a
    uniform and two logarithms for every vocabulary entry at every masked position; this needs one uniform
    per position and one exp per entry, and takes about a quarter of the time on CPU (98 -> 23 ms for 16 x 19
    positions over an 8k vocabulary on one thread). Exact up to fp32 rounding of the running sum: a token
    with probability below ~1e-7 (float32's spacing near 1) is drawn with a rounded probability.
    """
    probs = torch.softmax(logits.detach().float() / temperature, dim=-1)
    cdf = probs.cumsum_(dim=-1)
    uniform = torch.stack([torch.rand(logits.shape[1], generator=g, device=logits.device) for g in gens])
    target = (uniform * cdf[..., -1])[..., None]  # scaled by the sum, which rounding may leave below 1
    # right=True: the first entry whose cumulative sum exceeds the target, so zero-probability tokens never win.
    picked = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return picked.clamp_(max=logits.shape[-1] - 1)


def replace_tokens(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, m: Masked, sampled: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The discriminator's input (the *original* sequence with a sample written in at every masked position)
    and its labels: 1 where the token differs from the original. A sample equal to the original is original."""
    sampled = torch.where(m.weights.bool(), sampled, m.targets)
    disc_ids = input_ids.scatter(1, m.positions, sampled)
    return disc_ids, (disc_ids != input_ids) & attention_mask.bool()


def masked_lm_logits(mlm, m: Masked, attention_mask, token_type_ids) -> torch.Tensor:
    """Encode the masked sequence with an ``ElectraForMaskedLM`` and project to the vocabulary only at the
    masked positions [B, N, V] (fp32), as the reference gathers them: projecting every position would spend
    most of a generator's FLOPs on outputs nobody reads."""
    hidden = mlm.electra(input_ids=m.input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
    hidden = hidden.last_hidden_state
    picked = hidden.gather(1, m.positions[..., None].expand(-1, -1, hidden.shape[-1]))
    return mlm.generator_lm_head(mlm.generator_predictions(picked)).float()


class ElectraObjective(nn.Module):
    """Generator + discriminator. ``forward`` returns loss and metric *sums* over the micro-batch; the train
    loop divides by the global batch's counts (see ``training_loss``)."""

    def __init__(self, generator, discriminator, cfg: ObjectiveConfig, special: dict[str, int], seed: int):
        super().__init__()
        self.generator = generator
        self.discriminator = discriminator
        self.cfg = cfg
        self.special = special
        self.seed = seed

    def forward(self, input_ids, attention_mask, token_type_ids, positions) -> dict[str, torch.Tensor]:
        gens = example_generators(self.seed, positions, input_ids.device)
        vocab = self.generator.config.vocab_size
        m = mask_tokens(input_ids, attention_mask, self.special, self.cfg, vocab, gens)

        gen_logits = masked_lm_logits(self.generator, m, attention_mask, token_type_ids)
        gen_nll = F.cross_entropy(gen_logits.transpose(1, 2), m.targets, reduction="none")  # [B, N]

        sampled = sample_tokens(gen_logits, self.cfg.temperature, gens)
        disc_ids, labels = replace_tokens(input_ids, attention_mask, m, sampled)

        disc_logits = self.discriminator(
            input_ids=disc_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).logits.float()
        real = attention_mask.float()
        disc_nll = F.binary_cross_entropy_with_logits(disc_logits, labels.float(), reduction="none")
        predicted = disc_logits > 0
        return {
            "gen_loss": (gen_nll * m.weights).sum(),
            "gen_correct": ((gen_logits.argmax(-1) == m.targets).float() * m.weights).sum().detach(),
            "n_masked": m.weights.sum(),
            "disc_loss": (disc_nll * real).sum(),
            "disc_correct": ((predicted == labels).float() * real).sum().detach(),
            "n_tokens": real.sum(),
            "disc_tp": (predicted & labels).sum().float().detach(),
            "disc_pred_pos": (predicted & attention_mask.bool()).sum().float().detach(),
            "n_replaced": labels.sum().float(),
        }


class MLMObjective(nn.Module):
    """BERT's masked LM on a discriminator-sized encoder: the baseline ELECTRA is compared against."""

    def __init__(self, mlm, cfg: ObjectiveConfig, special: dict[str, int], seed: int):
        super().__init__()
        self.mlm = mlm
        self.cfg = cfg
        self.special = special
        self.seed = seed

    def forward(self, input_ids, attention_mask, token_type_ids, positions) -> dict[str, torch.Tensor]:
        gens = example_generators(self.seed, positions, input_ids.device)
        m = mask_tokens(input_ids, attention_mask, self.special, self.cfg, self.mlm.config.vocab_size, gens)
        logits = masked_lm_logits(self.mlm, m, attention_mask, token_type_ids)
        nll = F.cross_entropy(logits.transpose(1, 2), m.targets, reduction="none")
        return {
            "gen_loss": (nll * m.weights).sum(),
            "gen_correct": ((logits.argmax(-1) == m.targets).float() * m.weights).sum().detach(),
            "n_masked": m.weights.sum(),
            "n_tokens": attention_mask.float().sum(),
        }


def training_loss(sums: dict[str, torch.Tensor], totals: dict[str, float], disc_weight: float) -> torch.Tensor:
    """This micro-batch's share of the global batch's loss: sums divided by the *global* counts."""
    loss = sums["gen_loss"] / max(totals["n_masked"], 1.0)
    if "disc_loss" in sums:
        loss = loss + disc_weight * sums["disc_loss"] / max(totals["n_tokens"], 1.0)
    return loss


def summarize(sums: dict[str, float], disc_weight: float) -> dict[str, float]:
    """Loggable metrics from sums accumulated over a global batch (and all ranks)."""
    n_masked, n_tokens = max(sums["n_masked"], 1.0), max(sums["n_tokens"], 1.0)
    out = {"gen_loss": sums["gen_loss"] / n_masked, "gen_acc": sums["gen_correct"] / n_masked}
    if "disc_loss" in sums:
        out["disc_loss"] = sums["disc_loss"] / n_tokens
        out["disc_acc"] = sums["disc_correct"] / n_tokens
        out["disc_precision"] = sums["disc_tp"] / max(sums["disc_pred_pos"], 1.0)
        out["disc_recall"] = sums["disc_tp"] / max(sums["n_replaced"], 1.0)
        out["replaced_frac"] = sums["n_replaced"] / n_tokens
        out["loss"] = out["gen_loss"] + disc_weight * out["disc_loss"]
    else:
        out["loss"] = out["gen_loss"]
    return out


def build_objective(cfg, special: dict[str, int]) -> nn.Module:
    from electra_scale.model import build_electra, build_mlm

    if cfg.objective.kind == "mlm":
        return MLMObjective(build_mlm(cfg.model), cfg.objective, special, cfg.train.seed)
    generator, discriminator = build_electra(cfg.model)
    return ElectraObjective(generator, discriminator, cfg.objective, special, cfg.train.seed)
