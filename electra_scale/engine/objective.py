"""Replaced token detection (ELECTRA) and the masked-LM baseline, behind one interface.

Follows google-research/electra (``run_pretraining.py``, ``pretrain/pretrain_helpers.py``):

1. Mask (engine/masking.py, which also draws every random number the objective uses): per example,
   ``num_to_predict = max(1, min(N, round(num_tokens * mask_prob)))`` positions with
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

The forward passes are written against a layout (engine/packing.py): the padded [B, L] batch, or with
``train.unpad`` one flat row of its real tokens, where only those are computed. The losses are the same.

``objective.temperature`` is the reference's ``temp`` (1.0 in its presets and in ours from Small up). The tiny
preset samples at 2: at its size the generator's temperature-1 samples are, within ~100 steps, replacements the
discriminator cannot tell from the originals, and it collapses to the base rate (docs/paper.md, "Small scale").

Options beyond the paper (all off by default; the presets keep the paper's settings):
- ``whole_word_mask``: whole words are masked (``whole_word_positions``), as BERT's later release did.
- ``temperature_start`` / ``temperature_warmup_steps``: a generator curriculum (``sampling_temperature``).
- ``embedding_sharing: gdes``: DeBERTa-v3's gradient-disentangled embedding sharing (``ElectraObjective``).

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

import copy

import torch
import torch.nn.functional as F
from torch import nn

from electra_scale.config import ObjectiveConfig
from electra_scale.engine.auc import auc, probability_histograms
from electra_scale.engine.masking import Masked, draw_and_mask
from electra_scale.engine.packing import layout


def sampling_temperature(cfg: ObjectiveConfig, step: int) -> float:
    """The generator curriculum: ``temperature_start`` falling linearly to ``temperature`` over the first
    ``temperature_warmup_steps`` steps (then constant). A hotter softmax gives near-uniform replacements, which
    the discriminator can tell apart early on; as the generator learns, the samples harden. google-research/
    electra has no curriculum (and the paper's settings keep it off); the failure it answers, a generator that
    gets too good too quickly, is the one the reference's author describes in its issue #37."""
    if cfg.temperature_start is None or step >= cfg.temperature_warmup_steps:
        return cfg.temperature
    frac = step / cfg.temperature_warmup_steps
    return cfg.temperature_start + (cfg.temperature - cfg.temperature_start) * frac


@torch.no_grad()
def sample_tokens(logits: torch.Tensor, temperature: float, uniform: torch.Tensor) -> torch.Tensor:
    """One token per masked position from softmax(logits / T), drawn by inverting its CDF: cumulative sum of
    the probabilities, one uniform per position (``uniform`` [B, N]), binary search. Always fp32: a bf16/fp16
    running sum over the vocabulary would be far too coarse.

    The reference draws the same distribution with Gumbel-max (argmax(logits + Gumbel noise)), which needs a
    uniform and two logarithms for every vocabulary entry at every masked position; this needs one uniform
    per position and one exp per entry, and takes about a quarter of the time on CPU (98 -> 23 ms for 16 x 19
    positions over an 8k vocabulary on one thread). Exact up to fp32 rounding of the running sum: a token
    with probability below ~1e-7 (float32's spacing near 1) is drawn with a rounded probability.
    """
    probs = torch.softmax(logits.detach().float() / temperature, dim=-1)
    cdf = probs.cumsum_(dim=-1)
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


def masked_lm_logits(mlm, lay, m: Masked, token_type_ids) -> torch.Tensor:
    """Encode the masked sequence with an ``ElectraForMaskedLM`` and project to the vocabulary only at the
    masked slots [S, V] (``lay``: engine/packing.py's layout), as the reference gathers them: projecting every
    position would spend most of a generator's FLOPs on outputs nobody reads.

    The projection runs in fp32 (TF32 on GPUs, which is exact for bf16 inputs), so the logits that sampling
    uses are not rounded to bf16 first: a bf16 logit near 20 is off by up to 0.06, which moves a token's
    sampling probability by ~6%. The reference computed everything in fp32. The logits are rows, so the
    cross-entropy's log-softmax runs over the contiguous last axis (the strided kernel that [B, V, N] takes
    was measured on an H200 at 50 ms of Base's 196 ms step)."""
    hidden = mlm.electra(**lay.encoder_inputs(m.input_ids, token_type_ids)).last_hidden_state
    picked = mlm.generator_predictions(lay.at_slots(hidden, m.positions))
    head = mlm.generator_lm_head
    with torch.autocast(picked.device.type, enabled=False):
        bias = head.bias.float() if head.bias is not None else None
        return F.linear(picked.float(), head.weight.float(), bias)


class _Masking(nn.Module):
    """What ELECTRA and the MLM baseline share: the special ids, the seed, the continuation table for
    whole-word masking, and the masked-position count when it is only known on the device."""

    def __init__(self, cfg: ObjectiveConfig, special: dict[str, int], seed: int, vocab_size: int, continuation):
        super().__init__()
        self.cfg, self.special, self.seed, self.vocab_size = cfg, special, seed, vocab_size
        if cfg.whole_word_mask and continuation is None:  # an empty list is a vocabulary of one-piece words
            raise ValueError("objective.whole_word_mask needs the vocabulary's continuation pieces (data/words.py)")
        table = torch.zeros(vocab_size, dtype=torch.bool)
        if continuation:
            table[torch.tensor(continuation, dtype=torch.long)] = True
        self.register_buffer("continuation", table, persistent=False)  # [V]: continues a word?

    def count_masked(
        self, input_ids, attention_mask, token_type_ids, positions, padded=True, packing=None
    ) -> torch.Tensor:
        """The masked positions of a micro-batch, as a device tensor: with whole words the count depends on the
        words, so the train loop cannot know it from the data's counts (``count_batch_targets``)."""
        _, m = draw_and_mask(self, input_ids, attention_mask, positions, self.vocab_size)
        return m.weights.sum()


class ElectraObjective(_Masking):
    """Generator + discriminator. ``forward`` returns loss and metric *sums* over the micro-batch; the train
    loop divides by the global batch's counts (see ``training_loss``).

    ``embedding_sharing: gdes`` (He et al. 2021, "DeBERTaV3", section 3): the one word-embedding table E_G
    stays the generator's, and the discriminator looks its tokens up in stop_gradient(E_G) + E_delta, with
    E_delta (``gdes_delta``) starting at zero. The MLM loss alone trains E_G, the discriminator's loss only
    E_delta, which ends the tug-of-war in which the two losses pull the shared table in opposite directions.
    Position and token-type embeddings and the embedding LayerNorm stay shared, as in the paper (DeBERTa has no
    absolute position embeddings to decide about). ``export`` writes E_G + E_delta as a standard discriminator."""

    def __init__(
        self, generator, discriminator, cfg: ObjectiveConfig, special: dict[str, int], seed: int, continuation=None
    ):
        super().__init__(cfg, special, seed, generator.config.vocab_size, continuation)
        self.generator = generator
        self.discriminator = discriminator
        self.step = 0  # the optimizer step being taken (train_step sets it): the curriculum's clock
        if cfg.embedding_sharing == "gdes":
            table = discriminator.electra.embeddings.word_embeddings
            self.gdes_delta = nn.Embedding(table.num_embeddings, table.embedding_dim, padding_idx=table.padding_idx)
            nn.init.zeros_(self.gdes_delta.weight)

    def discriminator_embeddings(self, disc_ids: torch.Tensor) -> torch.Tensor:
        """GDES's word embeddings for the discriminator: stop_gradient(E_G)[ids] + E_delta[ids]."""
        shared = self.discriminator.electra.embeddings.word_embeddings(disc_ids)
        return shared.detach() + self.gdes_delta(disc_ids)

    @torch.no_grad()
    def exported_discriminator(self) -> nn.Module:
        """The discriminator as a standard ``ElectraForPreTraining``: with gdes, a copy whose word embeddings are
        E_G + E_delta (its own table; the generator keeps E_G)."""
        if self.cfg.embedding_sharing != "gdes":
            return self.discriminator
        folded = copy.deepcopy(self.discriminator)
        folded.electra.embeddings.word_embeddings.weight.add_(self.gdes_delta.weight)
        return folded

    def forward(
        self, input_ids, attention_mask, token_type_ids, positions, padded=True, packing=None, eval_seed=None
    ) -> dict[str, torch.Tensor]:
        """``padded``: whether any example is padded (known on the host); ``packing``: an engine/packing.py
        ``Packing`` to run padding-free (train.unpad), else None. ``eval_seed``: a held-out evaluation's
        (engine/evaluate.py): it keys the masks and samples in place of the train seed (``positions`` are then
        indices in the eval set), and samples at ``temperature``, the curriculum's end."""
        draws, m = draw_and_mask(self, input_ids, attention_mask, positions, self.vocab_size, eval_seed)
        lay = layout(attention_mask, padded, packing)
        temperature = sampling_temperature(self.cfg, self.step) if eval_seed is None else self.cfg.temperature

        gen_logits = masked_lm_logits(self.generator, lay, m, token_type_ids)  # [S, V] at the masked slots
        targets, weights = lay.slots(m.targets), lay.slots(m.weights)
        gen_nll = F.cross_entropy(gen_logits, targets, reduction="none")

        sampled = sample_tokens(gen_logits, temperature, lay.slots(draws.sample))
        disc_ids, labels = replace_tokens(input_ids, attention_mask, m, lay.unslot(sampled, m.targets))

        disc_inputs = lay.encoder_inputs(disc_ids, token_type_ids)
        if self.cfg.embedding_sharing == "gdes":
            disc_inputs["inputs_embeds"] = self.discriminator_embeddings(disc_inputs.pop("input_ids"))
        disc_logits = lay.encoder_output(self.discriminator(**disc_inputs).logits.float())
        labels, real = lay.tokens(labels), lay.tokens(attention_mask).float()
        disc_nll = F.binary_cross_entropy_with_logits(disc_logits, labels.float(), reduction="none")
        predicted = disc_logits > 0
        return {
            "gen_loss": (gen_nll * weights).sum(),
            "gen_correct": ((gen_logits.argmax(-1) == targets).float() * weights).sum().detach(),
            "n_masked": weights.sum(),
            "disc_loss": (disc_nll * real).sum(),
            "disc_correct": ((predicted == labels).float() * real).sum().detach(),
            "n_tokens": real.sum(),
            "disc_tp": (predicted & labels).sum().float().detach(),
            "disc_pred_pos": (predicted & real.bool()).sum().float().detach(),
            "n_replaced": labels.sum().float(),
            "disc_hist": probability_histograms(disc_logits, labels, real),  # for the AUC (engine/auc.py)
        }


class MLMObjective(_Masking):
    """BERT's masked LM on a discriminator-sized encoder: the baseline ELECTRA is compared against."""

    def __init__(self, mlm, cfg: ObjectiveConfig, special: dict[str, int], seed: int, continuation=None):
        super().__init__(cfg, special, seed, mlm.config.vocab_size, continuation)
        self.mlm = mlm

    def forward(
        self, input_ids, attention_mask, token_type_ids, positions, padded=True, packing=None, eval_seed=None
    ) -> dict[str, torch.Tensor]:
        _, m = draw_and_mask(self, input_ids, attention_mask, positions, self.vocab_size, eval_seed)
        lay = layout(attention_mask, padded, packing)
        logits = masked_lm_logits(self.mlm, lay, m, token_type_ids)
        targets, weights = lay.slots(m.targets), lay.slots(m.weights)
        nll = F.cross_entropy(logits, targets, reduction="none")
        return {
            "gen_loss": (nll * weights).sum(),
            "gen_correct": ((logits.argmax(-1) == targets).float() * weights).sum().detach(),
            "n_masked": weights.sum(),
            "n_tokens": attention_mask.float().sum(),
        }


def training_loss(sums: dict[str, torch.Tensor], totals: dict, disc_weight: float) -> torch.Tensor:
    """This micro-batch's share of the global batch's loss: sums divided by the *global* counts (numbers, or
    device tensors that an all-reduce fills in)."""

    def at_least_one(x):
        return x.clamp_min(1.0) if isinstance(x, torch.Tensor) else max(x, 1.0)

    loss = sums["gen_loss"] / at_least_one(totals["n_masked"])
    if "disc_loss" in sums:
        loss = loss + disc_weight * sums["disc_loss"] / at_least_one(totals["n_tokens"])
    return loss


def summarize(sums: dict, disc_weight: float) -> dict[str, float]:
    """Loggable metrics from sums accumulated over a global batch (and all ranks): numbers, and the AUC's
    histograms as a list or tensor."""
    n_masked, n_tokens = max(sums["n_masked"], 1.0), max(sums["n_tokens"], 1.0)
    out = {"gen_loss": sums["gen_loss"] / n_masked, "gen_acc": sums["gen_correct"] / n_masked}
    if "disc_loss" in sums:
        out["disc_loss"] = sums["disc_loss"] / n_tokens
        out["disc_acc"] = sums["disc_correct"] / n_tokens
        out["disc_precision"] = sums["disc_tp"] / max(sums["disc_pred_pos"], 1.0)
        out["disc_recall"] = sums["disc_tp"] / max(sums["n_replaced"], 1.0)
        out["replaced_frac"] = sums["n_replaced"] / n_tokens
        if "disc_hist" in sums:
            out["disc_auc"] = auc(sums["disc_hist"])
        out["loss"] = out["gen_loss"] + disc_weight * out["disc_loss"]
    else:
        out["loss"] = out["gen_loss"]
    return out


def build_objective(cfg, special: dict[str, int], continuation: list[int] | None = None) -> nn.Module:
    """The run's objective module. ``continuation``: the ids that continue a word (data/words.py
    ``continuation_ids``), needed by ``objective.whole_word_mask``."""
    from electra_scale.engine.model import build_electra, build_mlm

    if cfg.objective.kind == "mlm":
        return MLMObjective(build_mlm(cfg.model, special["pad"]), cfg.objective, special, cfg.train.seed, continuation)
    generator, discriminator = build_electra(cfg.model, special["pad"])
    return ElectraObjective(generator, discriminator, cfg.objective, special, cfg.train.seed, continuation)
