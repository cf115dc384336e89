"""Padding-free micro-batches (``train.unpad``): the encoders compute only real tokens.

A micro-batch of B examples padded to L becomes one row of its T = sum(lengths) real tokens, example after
example, each with its own position ids, and attention is kept inside each example by its cumulative sequence
lengths (``cu_seqlens``), the layout of FlashAttention's variable-length kernel. Masking, sampling and labels
stay on the padded [B, L] layout, where they are a few cheap elementwise kernels; what is expensive moves to the
flat one: both encoders, the generator's vocabulary projection (run at the M masked slots in use rather than at
all B x N, most of which are empty in short examples) and the discriminator's head.

The objective is written once against a *layout* (``PaddedLayout`` or ``PackedLayout``): how to feed an
encoder, how to pick the hidden states at the masked slots, and how to lay out per-token and per-slot values.
The two give the same losses up to float rounding (tests/test_packing.py: relative 1e-5 in fp32).

Nothing here waits for the device: the flat indices are built on the host from the per-example counts the data
path already has (``MicroBatch.lengths``, ``candidates``), in one int64 tensor copied without blocking.

Attention (``attention``, registered with transformers as ``electra_scale``; model.py builds the Electra classes
with it): without a packing it is transformers' SDPA path unchanged. With one:
- CUDA, bf16/fp16: FlashAttention's variable-length kernel (``aten::_flash_attention_forward``, the op behind
  torch's ``varlen_attn``, called directly because it takes the attention dropout that ``varlen_attn`` lacks;
  the paper's models use 0.1);
- otherwise (CPU, fp32): SDPA over the examples of each length in one batched call, exact. Attention per
  example is what padding-free buys on a CPU too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Packing:
    """Where a micro-batch's real tokens and used masked slots sit, as device tensors (plus host numbers)."""

    tokens: torch.Tensor  # [T] index into the flattened [B, L] of each real token, example after example
    position_ids: torch.Tensor  # [1, T] each token's position in its own example
    cu_seqlens: torch.Tensor  # [B + 1] int32, where each example starts in the flat row (and T at the end)
    slots: torch.Tensor  # [M] index into the flattened [B, N] of each masked slot in use
    groups: tuple[torch.Tensor, ...]  # per distinct length l: [n, l] flat-row indices of its n examples' tokens
    ungroup: torch.Tensor  # [T] where each flat-row token sits in the groups' concatenation
    max_seqlen: int  # host: the longest example


def pack(lengths: torch.Tensor, slots_used: torch.Tensor, seq_len: int, slots_per_example: int, device) -> Packing:
    """The packing of a micro-batch from host tensors: ``lengths`` [B] real tokens per example, ``slots_used`` [B]
    masked slots in use per example (at most ``slots_per_example``, the reference's max_predictions_per_seq)."""
    lengths, slots_used = lengths.long().cpu(), slots_used.long().cpu()
    B = lengths.numel()
    ends = lengths.cumsum(0)
    starts = ends - lengths
    # Index of every element within its own example, for T tokens and for M slots.
    within = torch.arange(int(ends[-1])) - starts.repeat_interleave(lengths)
    slot_ends = slots_used.cumsum(0)
    slot_within = torch.arange(int(slot_ends[-1])) - (slot_ends - slots_used).repeat_interleave(slots_used)
    tokens = (torch.arange(B) * seq_len).repeat_interleave(lengths) + within
    slots = (torch.arange(B) * slots_per_example).repeat_interleave(slots_used) + slot_within
    cu = torch.cat([torch.zeros(1, dtype=torch.long), ends])
    # Examples of equal length, for the CPU's attention (one batched SDPA call per length): a corpus of long
    # documents has mostly full-length examples, which then attend in one call, as in a padded batch.
    distinct, counts = torch.unique(lengths, return_counts=True)
    shapes = [(int(n), int(length)) for length, n in zip(distinct, counts)]  # (examples, their length)
    grouped = torch.cat([(starts[lengths == k][:, None] + torch.arange(k)).flatten() for _, k in shapes])
    ungroup = torch.empty_like(grouped)
    ungroup[grouped] = torch.arange(grouped.numel())
    # One host-to-device copy for all (pinned and non-blocking on a GPU), split on the device.
    host = torch.cat([tokens, within, slots, cu, grouped, ungroup])
    if torch.device(device).type == "cuda":
        host = host.pin_memory()
    flat = host.to(device, non_blocking=True)
    t, m = tokens.numel(), slots.numel()
    tokens_d, within_d, slots_d, cu_d, grouped_d, ungroup_d = flat.split([t, t, m, B + 1, t, t])
    return Packing(
        tokens=tokens_d,
        position_ids=within_d[None],
        cu_seqlens=cu_d.int(),
        slots=slots_d,
        groups=tuple(g.view(shape) for g, shape in zip(grouped_d.split([n * k for n, k in shapes]), shapes)),
        ungroup=ungroup_d,
        max_seqlen=int(lengths.max()),
    )


class PaddedLayout:
    """The [B, L] layout: every position is computed, padding masked out of attention."""

    def __init__(self, attention_mask: torch.Tensor, padded: bool):
        # None when no example is padded (SDPA may then take its flash kernel); else the 4-D form transformers
        # passes to SDPA unchanged. Given the 2-D mask it would test it for padding with ``.all()``, which makes
        # the host wait for the GPU.
        self.mask = attention_mask[:, None, None, :].bool() if padded else None

    def encoder_inputs(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> dict:
        return {"input_ids": input_ids, "attention_mask": self.mask, "token_type_ids": token_type_ids}

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """A per-token [B, L] tensor in this layout's token order."""
        return x

    def encoder_output(self, x: torch.Tensor) -> torch.Tensor:
        """An encoder's per-token output ([B, L, ...]) in this layout's token order."""
        return x

    def slots(self, x: torch.Tensor) -> torch.Tensor:
        """A per-slot [B, N] tensor as the layout's slot list [S]."""
        return x.flatten(0, 1)

    def at_slots(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The hidden states [S, H] at the masked slots (``positions`` [B, N])."""
        picked = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
        return picked.flatten(0, 1)

    def unslot(self, values: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        """Slot-list values [S] back as [B, N]; slots not in the list keep ``fill``'s value."""
        return values.view_as(fill)


class PackedLayout:
    """The flat layout of ``Packing``: one row of real tokens; the slot list holds only the slots in use."""

    def __init__(self, packing: Packing):
        self.p = packing

    def encoder_inputs(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> dict:
        return {
            "input_ids": self.tokens(input_ids)[None],
            "token_type_ids": self.tokens(token_type_ids)[None],
            "position_ids": self.p.position_ids,
            "attention_mask": None,
            "packing": self.p,  # passed down by transformers to ``attention``
        }

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten()[self.p.tokens]

    def encoder_output(self, x: torch.Tensor) -> torch.Tensor:
        return x[0]  # the one row

    def slots(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten()[self.p.slots]

    def at_slots(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        starts = self.p.cu_seqlens[:-1].long()
        return hidden[0][self.slots(starts[:, None] + positions)]

    def unslot(self, values: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        return fill.flatten().index_copy(0, self.p.slots, values.to(fill.dtype)).view_as(fill)


def layout(attention_mask: torch.Tensor, padded: bool, packing: Packing | None) -> PaddedLayout | PackedLayout:
    return PackedLayout(packing) if packing is not None else PaddedLayout(attention_mask, padded)


# ------------------------------------------------------------------------------------------ attention
def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, packing=None, **kwargs):
    """transformers' attention interface: q, k, v [B, heads, S, d] -> ([B, S, heads, d], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packing is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout)
    return _packed_attention(query, key, value, packing, scaling, dropout), None


@torch.compiler.disable  # host numbers (spans, max length) per batch: kept out of compiled graphs (train.compile)
def _packed_attention(query, key, value, p: Packing, scale, dropout: float) -> torch.Tensor:
    if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16):
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, heads, d]
        out = torch.ops.aten._flash_attention_forward(
            q, k, v, p.cu_seqlens, p.cu_seqlens, p.max_seqlen, p.max_seqlen, dropout, False, False, scale=scale
        )[0]
        return out[None]
    outs = []
    for index in p.groups:  # [n, l]: n examples of length l, attended in one batched call
        q, k, v = (x[0][:, index].transpose(0, 1) for x in (query, key, value))  # [n, heads, l, d]
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale)
        outs.append(out.transpose(0, 1).flatten(1, 2))  # [heads, n * l]
    return torch.cat(outs, dim=1)[:, p.ungroup].transpose(0, 1)[None]  # [1, T, heads, d]


def register() -> str:
    """Register ``attention`` with transformers (idempotent); returns its name, for ``attn_implementation``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the padded path's masks: SDPA's
    return ATTENTION


ATTENTION = "electra_scale"
