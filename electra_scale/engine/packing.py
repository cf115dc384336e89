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
with it): without a packing it is transformers' SDPA path unchanged. With one, the custom op
``electra_scale::varlen_attention`` (a ``torch.library.custom_op`` with a fake implementation and its own
backward, so that a compiled layer traces it into one graph instead of breaking around it):
- CUDA, bf16/fp16: FlashAttention's variable-length kernel (``aten::_flash_attention_forward``, the op behind
  torch's ``varlen_attn``, called directly because it takes the attention dropout that ``varlen_attn`` lacks;
  the paper's models use 0.1), and its backward, ``aten::_flash_attention_backward``; fp32 on CUDA is refused
  (step.settle_device): the kernel has no fp32;
- CPU: a reference implementation, exact: the examples of each length in one batched matmul-softmax-matmul,
  dropout from a seed drawn from torch's generator (so a resume replays it) and replayed in the backward.
  Attention per example is what padding-free buys on a CPU too. docs/gpu.md reviews the CUDA branch against
  torch 2.11's sources.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Packing:
    """Where a micro-batch's real tokens and used masked slots sit, as device tensors (plus host numbers)."""

    tokens: torch.Tensor  # [T] index into the flattened [B, L] of each real token, example after example
    position_ids: torch.Tensor  # [1, T] each token's position in its own example
    cu_seqlens: torch.Tensor  # [B + 1] int32, where each example starts in the flat row (and T at the end)
    slots: torch.Tensor  # [M] index into the flattened [B, N] of each masked slot in use
    # The kernel's bound on an example's length: the padded length L, the same every batch, so a compiled layer
    # sees one constant (not a new int per batch: a recompile or a symbolic int). FlashAttention sizes its grid
    # by it; the blocks past an example's end return at once.
    max_seqlen: int


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
    # One host-to-device copy for all (pinned and non-blocking on a GPU), split on the device.
    host = torch.cat([tokens, within, slots, cu])
    if torch.device(device).type == "cuda":
        host = host.pin_memory()
    flat = host.to(device, non_blocking=True)
    t, m = tokens.numel(), slots.numel()
    tokens_d, within_d, slots_d, cu_d = flat.split([t, t, m, B + 1])
    return Packing(
        tokens=tokens_d,
        position_ids=within_d[None],
        cu_seqlens=cu_d.int(),  # the kernel's int32, made on the device
        slots=slots_d,
        max_seqlen=seq_len,
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


def _packed_attention(query, key, value, p: Packing, scale, dropout: float) -> torch.Tensor:
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))  # [T, heads, d], as the kernel's
    check_varlen(q, k, v, p.cu_seqlens, p.max_seqlen)
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5  # transformers passes its own
    return varlen_attention(q, k, v, p.cu_seqlens, p.max_seqlen, float(dropout), scale)[0][None]


def check_varlen(q, k, v, cu_seqlens, max_seqlen) -> None:
    """The contract of aten::_flash_attention_forward's variable-length path (torch 2.11: docs/gpu.md), checked
    on every device before the call, from tensor metadata only (no sync): q, k, v [T, heads, d], contiguous,
    one dtype, head dim a multiple of 8 up to 256; cu_seqlens int32 [B + 1] on their device; a Python int bound."""
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"varlen attention wants q, k, v of one shape [T, heads, d]; got {q.shape}, {k.shape}, {v.shape}"
        )
    if not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
        raise ValueError("varlen attention wants contiguous q, k, v (the kernel reads their last dim with stride 1)")
    if not (q.dtype == k.dtype == v.dtype) or (q.is_cuda and q.dtype not in (torch.bfloat16, torch.float16)):
        raise ValueError(
            f"varlen attention on CUDA wants q, k, v all bf16 or fp16; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if q.shape[-1] % 8 or q.shape[-1] > 256:
        raise ValueError(f"FlashAttention wants a head dim that is a multiple of 8, at most 256; got {q.shape[-1]}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.device != q.device:
        raise ValueError(
            f"cu_seqlens must be int32 [B + 1] on {q.device}; got {cu_seqlens.dtype} on {cu_seqlens.device}"
        )
    if not isinstance(max_seqlen, int):
        raise ValueError(
            f"max_seqlen must be a Python int (the kernel sizes its grid on the host); got {type(max_seqlen)}"
        )


@torch.library.custom_op("electra_scale::varlen_attention", mutates_args=())
def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [T, heads, d], logsumexp [heads, T] fp32, and two tensors the backward needs to replay the dropout:
    FlashAttention's rng_state and unused on CUDA; the dropout seed and an empty tensor on CPU)."""
    if q.is_cuda:
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout, False, False, scale=scale
        )
        return out, lse, rng_state, unused
    seed = torch.randint(0, 2**62, (1,)) if dropout > 0 else torch.zeros(1, dtype=torch.long)
    out, lse = _reference_attention(q, k, v, cu_seqlens, dropout, scale, seed)
    return out, lse, seed, q.new_empty(0)


@varlen_attention.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, dropout, scale):
    if q.device.type == "cuda":
        # torch's own meta kernel for the very call the real impl makes: the rng_state layout is the installed
        # torch's, whatever it is (uint64[2] + uint64[] from 2.7, pytorch#146372; two int64[] before, and on
        # ROCm still), so a compiled graph never disagrees with the kernel it runs. tests/test_gpu.py checks it.
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout, False, False, scale=scale
        )
        return out, lse, rng_state, unused
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return torch.empty_like(q), lse, q.new_empty(1, dtype=torch.long), q.new_empty(0)


@torch.library.custom_op("electra_scale::varlen_attention_backward", mutates_args=())
def varlen_attention_backward(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout: float,
    scale: float,
    rng_state: torch.Tensor,
    unused: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if q.is_cuda:
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad.contiguous(), q, k, v, out, lse, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout, False,
            rng_state, unused, scale=scale,
        )  # fmt: skip
        return dq, dk, dv
    return _reference_attention(q, k, v, cu_seqlens, dropout, scale, rng_state, grad)  # the same dropout mask


@varlen_attention_backward.register_fake
def _(grad, q, k, v, out, lse, cu_seqlens, max_seqlen, dropout, scale, rng_state, unused):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _save(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, max_seqlen, dropout, scale = inputs
    out, lse, rng_state, unused = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, rng_state, unused)
    ctx.max_seqlen, ctx.dropout, ctx.scale = max_seqlen, dropout, scale


def _backward(ctx, grad, *_):
    q, k, v, out, lse, cu, rng_state, unused = ctx.saved_tensors
    dq, dk, dv = varlen_attention_backward(
        grad, q, k, v, out, lse, cu, ctx.max_seqlen, ctx.dropout, ctx.scale, rng_state, unused
    )
    return dq, dk, dv, None, None, None, None


varlen_attention.register_autograd(_backward, setup_context=_save)


def _reference_attention(q, k, v, cu_seqlens, dropout: float, scale: float, seed: torch.Tensor, grad=None):
    """Exact attention within each example, on the host's tensors: the examples of each length in one batched
    call (a corpus of long documents has mostly full-length examples, which then attend at once, as a padded
    batch does). Returns (out [T, heads, d], logsumexp [heads, T]); given ``grad`` (of out), the gradients of
    q, k and v instead, written out (a custom op's implementation runs below autograd), with the dropout mask
    drawn again from ``seed``."""
    starts, lengths = cu_seqlens[:-1].long(), cu_seqlens.diff().long()
    heads, d = q.shape[1], q.shape[2]
    results = [torch.zeros_like(x) for x in ((q, k, v) if grad is not None else (q,))]
    lse = q.new_zeros((heads, q.shape[0]), dtype=torch.float32)
    generator = torch.Generator().manual_seed(int(seed)) if dropout > 0 else None
    for length in sorted(set(lengths.tolist()) - {0}):
        index = (starts[lengths == length][:, None] + torch.arange(length)).flatten()  # [n * l]
        n = index.numel() // length

        qi, ki, vi = (x[index].view(n, length, heads, d).transpose(1, 2) for x in (q, k, v))  # [n, heads, l, d]

        def back(x, n=n, length=length):  # [n, heads, l, d] -> [n * l, heads, d]
            return x.transpose(1, 2).reshape(n * length, heads, d)

        scores = (qi @ ki.transpose(-1, -2)) * scale
        probs = scores.softmax(-1)
        keep = 1.0
        if generator is not None:
            keep = (torch.rand(probs.shape, generator=generator) >= dropout).to(probs.dtype) / (1 - dropout)
        if grad is None:
            results[0][index] = back((probs * keep) @ vi)
            lse[:, index] = scores.logsumexp(-1).float().permute(1, 0, 2).reshape(heads, n * length)
            continue
        g = grad[index].view(n, length, heads, d).transpose(1, 2)
        d_probs = (g @ vi.transpose(-1, -2)) * keep
        d_scores = probs * (d_probs - (d_probs * probs).sum(-1, keepdim=True)) * scale
        results[0][index] = back(d_scores @ ki)
        results[1][index] = back(d_scores.transpose(-1, -2) @ qi)
        results[2][index] = back((probs * keep).transpose(-1, -2) @ g)
    return tuple(results) if grad is not None else (results[0], lse)


def register() -> str:
    """Register ``attention`` with transformers (idempotent); returns its name, for ``attn_implementation``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the padded path's masks: SDPA's
    return ATTENTION


ATTENTION = "electra_scale"
