"""Build ELECTRA's generator and discriminator from transformers' Electra classes.

As in google-research/electra (``shared_embeddings=True``), the two networks share one embeddings module:
word, position and token-type embeddings plus the embedding LayerNorm. The generator is narrower, so it keeps
its own ``embeddings_project`` (embedding_size -> generator hidden); its output layer is tied to the shared
word embeddings (transformers' ``ElectraForMaskedLM`` ties ``generator_lm_head`` to them).
"""

from __future__ import annotations

import torch
from transformers import ElectraConfig, ElectraForMaskedLM, ElectraForPreTraining

from electra_scale.config import Config, ModelConfig

# SDPA is transformers' fused attention path (FlashAttention-style kernels on GPU).
ATTENTION = "sdpa"


def _electra_config(m: ModelConfig, hidden: int, heads: int, ffn: int) -> ElectraConfig:
    return ElectraConfig(
        vocab_size=m.vocab_size,
        embedding_size=m.embedding_size,
        hidden_size=hidden,
        num_hidden_layers=m.num_layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=m.max_position_embeddings,
        hidden_dropout_prob=m.dropout,
        attention_probs_dropout_prob=m.attention_dropout,
        attn_implementation=ATTENTION,
    )


def discriminator_config(m: ModelConfig) -> ElectraConfig:
    return _electra_config(m, m.hidden_size, m.num_heads, m.intermediate_size)


def generator_config(m: ModelConfig) -> ElectraConfig:
    """Same depth as the discriminator, narrower."""
    return _electra_config(m, m.generator_hidden_size, m.gen_heads, m.gen_intermediate)


def build_electra(m: ModelConfig) -> tuple[ElectraForMaskedLM, ElectraForPreTraining]:
    """Generator and discriminator, sharing one embeddings module."""
    discriminator = ElectraForPreTraining(discriminator_config(m))
    generator = ElectraForMaskedLM(generator_config(m))
    generator.electra.embeddings = discriminator.electra.embeddings
    generator.generator_lm_head.weight = discriminator.electra.embeddings.word_embeddings.weight
    return generator, discriminator


def build_mlm(m: ModelConfig) -> ElectraForMaskedLM:
    """The BERT-style baseline: a discriminator-sized encoder with a masked-LM head."""
    return ElectraForMaskedLM(discriminator_config(m))


def count_params(module: torch.nn.Module) -> int:
    """Unique parameters: a tensor shared by two modules counts once (parameters() de-duplicates)."""
    return sum(p.numel() for p in module.parameters())


def param_counts(cfg: Config) -> dict[str, int]:
    """Parameter counts without allocating memory (modules are built on the meta device)."""
    with torch.device("meta"):
        if cfg.objective.kind == "mlm":
            model = build_mlm(cfg.model)
            n = count_params(model)
            return {
                "discriminator_params": count_params(model.electra),
                "generator_params": 0,
                "total_params": n,
            }
        generator, discriminator = build_electra(cfg.model)
        total = count_params(torch.nn.ModuleList([generator, discriminator]))
    return {
        "discriminator_params": count_params(discriminator),
        "generator_params": count_params(generator),
        "total_params": total,
    }


# ------------------------------------------------------------------------------------------------ FLOPs
def _encoder_flops(hidden: int, ffn: int, layers: int, seq_len: int, embedding: int) -> float:
    """Forward matmul FLOPs per token of one Transformer encoder (2 FLOPs per multiply-accumulate)."""
    per_layer = (
        2 * 4 * hidden * hidden  # Q, K, V and output projections
        + 2 * 2 * seq_len * hidden  # attention scores QK^T and the weighted sum of V
        + 2 * 2 * hidden * ffn  # the two FFN matmuls
    )
    project = 2 * embedding * hidden if embedding != hidden else 0
    return layers * per_layer + project


def flops_per_token(cfg: Config) -> float:
    """Training FLOPs per input token: forward matmuls x 3 (the backward pass costs twice the forward).

    Convention (the common "6N" one, not the reference's flops_computation.py, which also counts softmax,
    LayerNorm and activations): matmuls only, attention scores included, embedding lookups free, and the
    vocabulary projection counted only at the masked positions (mask_prob of the tokens), since that is all
    the objective computes. For ELECTRA the generator's FLOPs are counted too, as the paper does.
    """
    m, s, p = cfg.model, cfg.data.seq_len, cfg.objective.mask_prob
    disc = _encoder_flops(m.hidden_size, m.intermediate_size, m.num_layers, s, m.embedding_size)
    if cfg.objective.kind == "mlm":
        head = p * (2 * m.hidden_size * m.embedding_size + 2 * m.embedding_size * m.vocab_size)
        return 3.0 * (disc + head)
    disc_head = 2 * m.hidden_size * m.hidden_size + 2 * m.hidden_size  # dense + 1-logit output per token
    gen = _encoder_flops(m.generator_hidden_size, m.gen_intermediate, m.num_layers, s, m.embedding_size)
    gen_head = p * (2 * m.generator_hidden_size * m.embedding_size + 2 * m.embedding_size * m.vocab_size)
    return 3.0 * (disc + disc_head + gen + gen_head)


# Dense bf16 peak (TFLOP/s) of common accelerators, for the MFU estimate.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "V100": 125.0}


def peak_tflops(configured: float | None) -> float | None:
    if configured:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
    return None
