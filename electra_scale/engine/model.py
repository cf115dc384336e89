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
from electra_scale.engine import packing

# transformers' SDPA path for padded batches, and the variable-length one for padding-free batches
# (train.unpad): engine/packing.py.
ATTENTION = packing.register()

# What a checkpoint's weights are shaped by (another value cannot load them; dropout or init can change): our
# ModelConfig key -> the key of transformers' ElectraConfig (a Hugging Face config.json), as _electra_config maps
# them for the discriminator and for the generator.
DISCRIMINATOR_SHAPE = {
    "vocab_size": "vocab_size",
    "embedding_size": "embedding_size",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
}
GENERATOR_SHAPE = {
    "generator_hidden_size": "hidden_size",
    "generator_num_heads": "num_attention_heads",
    "generator_intermediate_size": "intermediate_size",
}
SHAPE_KEYS = (*DISCRIMINATOR_SHAPE, *GENERATOR_SHAPE)


def _electra_config(m: ModelConfig, hidden: int, heads: int, ffn: int, pad_id: int = 0) -> ElectraConfig:
    return ElectraConfig(
        pad_token_id=pad_id,  # the tokenizer's [PAD]: its embedding row gets no gradient
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


def discriminator_config(m: ModelConfig, pad_id: int = 0) -> ElectraConfig:
    return _electra_config(m, m.hidden_size, m.num_heads, m.intermediate_size, pad_id)


def generator_config(m: ModelConfig, pad_id: int = 0) -> ElectraConfig:
    """Same depth as the discriminator, narrower."""
    return _electra_config(m, m.generator_hidden_size, m.gen_heads, m.gen_intermediate, pad_id)


def build_electra(m: ModelConfig, pad_id: int = 0) -> tuple[ElectraForMaskedLM, ElectraForPreTraining]:
    """Generator and discriminator, sharing one embeddings module."""
    discriminator = ElectraForPreTraining(discriminator_config(m, pad_id))
    generator = ElectraForMaskedLM(generator_config(m, pad_id))
    generator.electra.embeddings = discriminator.electra.embeddings
    generator.generator_lm_head.weight = discriminator.electra.embeddings.word_embeddings.weight
    if m.init == "reference":
        reference_init(generator, pad_id)
        reference_init(discriminator, pad_id)
    return generator, discriminator


def build_mlm(m: ModelConfig, pad_id: int = 0) -> ElectraForMaskedLM:
    """The BERT-style baseline: a discriminator-sized encoder with a masked-LM head."""
    mlm = ElectraForMaskedLM(discriminator_config(m, pad_id))
    if m.init == "reference":
        reference_init(mlm, pad_id)
    return mlm


@torch.no_grad()
def reference_init(model: torch.nn.Module, pad_id: int) -> None:
    """google-research/electra's initialisation, in place of transformers' N(0, 0.02) for every Linear and
    Embedding: BERT's ``create_initializer`` (a normal of std 0.02 truncated at 2 std, ``tf.truncated_normal``)
    for the embeddings and the encoders' dense layers, and TensorFlow's ``tf.layers.dense`` default,
    glorot-uniform, for ``embeddings_project`` and the discriminator's 1-unit output. Biases 0, LayerNorm 1/0
    (as transformers already does). The [PAD] embedding row starts at zero, as transformers leaves it."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            if name.endswith("embeddings_project") or name.endswith("discriminator_predictions.dense_prediction"):
                torch.nn.init.xavier_uniform_(module.weight)
            else:
                torch.nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, torch.nn.Embedding):
            torch.nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()


def encoders(objective: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer stacks of an objective: the generator's and discriminator's, or the MLM's."""
    return [m.electra for m in (getattr(objective, n, None) for n in ("generator", "discriminator", "mlm")) if m]


def prepare_encoders(objective: torch.nn.Module, train) -> None:
    """train.activation_checkpointing and train.compile, applied to both encoders in place."""
    for encoder in encoders(objective):
        if train.activation_checkpointing:
            # Non-reentrant: works with DeepSpeed's hooks and replays dropout with the saved RNG state.
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if train.compile:
            # Regional: each encoder layer on its own, in place (parameter names, and so checkpoints, stay as
            # they are). The layers run the same code, so one layer's compile serves them all: compile time
            # stays that of a layer, not of the model. Inductor fuses the bias adds, GELU, dropout, residuals
            # and LayerNorms around the matmuls; attention is left to its own kernels (engine/packing.py).
            # Padding-free batches change length every step: compiled for dynamic shapes then.
            for layer in encoder.encoder.layer:
                layer.compile(backend=train.compile_backend, dynamic=True if train.unpad else None)


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
    if cfg.objective.embedding_sharing == "gdes":
        # E_delta, trained but folded into the exported discriminator (whose count stays its own). FLOPs do not
        # change: stop_gradient(E_G) + E_delta is one table to the math, looked up once per token.
        total += cfg.model.vocab_size * cfg.model.embedding_size
    return {
        "discriminator_params": count_params(discriminator),
        "generator_params": count_params(generator),
        "total_params": total,
    }


# ------------------------------------------------------------------------------------------------ FLOPs
# Two conventions, for two uses:
#
# training_flops         what the hardware must do for the real tokens: matmul FLOPs only (2 per multiply-
# flops_per_token        accumulate), backward = 2 x forward, sparse embedding lookups (free), attention scores
#                        included (per query-key pair within an example), and the vocabulary projection only at
#                        the masked positions. Used for TFLOP/s -> MFU, and it equals torch's FlopCounterMode
#                        count of a real training step, padded or padding-free (tests/test_flops.py).
#                        ELECTRA-Large (full-length examples, s = 512, 25% masking): 2.17 GFLOP per token.
# paper_flops_per_token  the ELECTRA paper's accounting (its Tables 1-2 and google-research/electra's
#                        flops_computation.py), for comparing against the paper's compute axis: every op counted
#                        (softmax, LayerNorm, GELU, dropout, biases), *dense* one-hot embedding lookups (2·e·V per
#                        token: the largest term for small models), and backward = 1 x forward, so training =
#                        2 x forward. ELECTRA-Large 400k steps x 2048 x 512: 7.1e20 (1.70 GFLOP per token).
#
# Both count the generator's FLOPs against ELECTRA, as the paper does.


def _encoder_flops(hidden: int, ffn: int, layers: int, embedding: int) -> tuple[float, float]:
    """Forward matmul FLOPs of one Transformer encoder (2 FLOPs per multiply-accumulate): (per token, per
    attended query-key pair). A token of an example of length l attends to l keys, so an example costs
    l x per_token + l^2 x per_pair."""
    per_token = layers * (2 * 4 * hidden * hidden + 2 * 2 * hidden * ffn)  # Q, K, V, output; the two FFN matmuls
    per_token += 2 * embedding * hidden if embedding != hidden else 0  # embeddings_project
    per_pair = layers * 2 * 2 * hidden  # the scores QK^T and the weighted sum of V
    return per_token, per_pair


def training_flops(cfg: Config, tokens: float, pairs: float) -> float:
    """Training FLOPs, hardware convention (see above), of ``tokens`` real tokens in examples that hold
    ``pairs`` attended query-key pairs in all (the sum of their squared lengths): the work that counts, whatever
    the batch layout. A padded batch computes more (its padding, and the vocabulary projection at unused slots),
    which is why throughput and MFU are counted in real tokens: padding shows as lost MFU.

    Counted: every encoder matmul incl. attention scores, the embedding -> hidden projection when they differ,
    the discriminator's head (dense h x h and the 1-logit output) at every token, and the generator's (or
    MLM's) head (dense h -> e, then e -> V) at ``mask_prob`` of the tokens. Not counted: embedding lookups,
    softmax, LayerNorm, activations, the optimizer. Backward = 2 x forward."""
    m, p = cfg.model, cfg.objective.mask_prob
    disc_tok, disc_pair = _encoder_flops(m.hidden_size, m.intermediate_size, m.num_layers, m.embedding_size)
    if cfg.objective.kind == "mlm":
        head = p * (2 * m.hidden_size * m.embedding_size + 2 * m.embedding_size * m.vocab_size)
        return 3.0 * (tokens * (disc_tok + head) + pairs * disc_pair)
    disc_head = 2 * m.hidden_size * m.hidden_size + 2 * m.hidden_size  # dense + 1-logit output per token
    gen_tok, gen_pair = _encoder_flops(m.generator_hidden_size, m.gen_intermediate, m.num_layers, m.embedding_size)
    gen_head = p * (2 * m.generator_hidden_size * m.embedding_size + 2 * m.embedding_size * m.vocab_size)
    return 3.0 * (tokens * (disc_tok + disc_head + gen_tok + gen_head) + pairs * (disc_pair + gen_pair))


def flops_per_token(cfg: Config) -> float:
    """Training FLOPs per token of full-length examples (``training_flops`` of one token attending to
    ``seq_len`` keys): the compute axis of compare's budgets. The code projects to the vocabulary at
    ``int((mask_prob + 0.005) * seq_len)`` slots per example (the reference's max_predictions_per_seq), which
    is mask_prob up to rounding (25% -> 130/512 = 25.4% for Large); we count mask_prob."""
    return training_flops(cfg, 1.0, float(cfg.data.seq_len))


# The reference's per-element costs of the non-matmul ops (flops_computation.py).
DROPOUT_FLOPS = 4  # random number, compare, mask, rescale
LAYER_NORM_FLOPS = 5  # mean, variance, bias, scale
ACTIVATION_FLOPS = 8  # tanh-approximated GELU
SOFTMAX_FLOPS = 5  # max-subtract, exp, sum, divide


def _paper_block(h: int, ffn: int, heads: int, s: int) -> float:
    """One encoder layer's forward FLOPs per token, as the reference counts them."""
    attention = (
        2 * 3 * h * h + 3 * h  # Q, K, V projections and biases
        + 2 * h * s + 2 * h * s  # scores, weighted sum of values
        + (SOFTMAX_FLOPS + DROPOUT_FLOPS + 1) * s * heads  # softmax, attention dropout, 1/sqrt(d) scaling
        + 2 * h * h + h + DROPOUT_FLOPS * h + h  # output projection, bias, dropout, residual
        # The reference counts this LayerNorm as 5 FLOPs per token, not per element (an oversight worth <0.01%
        # of the total); kept, so that the totals match its published numbers.
        + LAYER_NORM_FLOPS
    )  # fmt: skip
    ffn_flops = (
        2 * h * ffn + ACTIVATION_FLOPS * ffn + ffn  # up-projection, GELU, bias
        + 2 * h * ffn + h + DROPOUT_FLOPS * h + h + LAYER_NORM_FLOPS * h  # down, bias, dropout, residual, LN
    )  # fmt: skip
    return attention + ffn_flops


def _paper_input_embedding(h: int, e: int, v: int, s: int) -> float:
    """Dense (one-hot matmul) token, position and type lookups, their sum, LayerNorm and dropout, and the
    e -> h projection when they differ."""
    flops = 2 * e * v + 2 * e * (s + 2) + 2 * e + LAYER_NORM_FLOPS * e + DROPOUT_FLOPS * e
    if e != h:
        flops += 2 * h * e + h
    return flops


def _paper_lm_head(h: int, e: int, v: int) -> float:
    """The MLM head at one predicted position: dense h -> e, GELU, LayerNorm, e -> V, softmax, target pick."""
    return 2 * h * e + e + ACTIVATION_FLOPS * e + LAYER_NORM_FLOPS * e + 2 * e * v + SOFTMAX_FLOPS * v + 2 * v


def paper_flops_per_token(cfg: Config, output_frac: float | None = None) -> float:
    """Training FLOPs per input token in the ELECTRA paper's convention (see above).

    ``output_frac``: the share of positions the MLM head runs on; default ``objective.mask_prob``. The
    reference's script uses 0.15625 (80 of 512) for every model, ELECTRA-Large's 25% masking included: with
    it, ELECTRA-400K comes to 7.12e20; with the 25% the Large preset actually masks, 7.17e20.
    """
    m, s = cfg.model, cfg.data.seq_len
    frac = cfg.objective.mask_prob if output_frac is None else output_frac
    v, e = m.vocab_size, m.embedding_size

    def encoder(h: int, ffn: int, heads: int) -> float:
        return m.num_layers * _paper_block(h, ffn, heads, s) + _paper_input_embedding(h, e, v, s)

    disc = encoder(m.hidden_size, m.intermediate_size, m.num_heads)
    if cfg.objective.kind == "mlm":
        return 2.0 * (disc + frac * _paper_lm_head(m.hidden_size, e, v))
    h = m.hidden_size
    disc_head = 2 * h * h + h + ACTIVATION_FLOPS * h + 2 * h  # dense, bias, GELU, 1-logit output
    gen = encoder(m.generator_hidden_size, m.gen_intermediate, m.gen_heads)
    gen_head = frac * _paper_lm_head(m.generator_hidden_size, e, v)
    return 2.0 * (disc + disc_head + gen + gen_head)


# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s, for MFU: (name token, variant token or "", value),
# matched against torch.cuda.get_device_name() token by token, first match wins. fp16 peaks are the same;
# V100 and T4 have no bf16, so theirs are fp16. A run in fp32 is still measured against this peak.
GPU_PEAK_TFLOPS: list[tuple[str, str, float]] = [
    ("B200", "", 2250.0),
    ("GH200", "", 989.0),
    ("H200", "NVL", 835.0),  # the datasheet's 1,671 with sparsity, halved
    ("H200", "", 989.0),  # SXM
    ("H100", "PCIe", 756.0),
    ("H100", "NVL", 835.0),
    ("H100", "", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H800", "PCIe", 756.0),
    ("H800", "", 989.0),
    ("A100", "", 312.0),
    ("A800", "", 312.0),
    ("L40S", "", 362.0),
    ("L40", "", 181.0),
    ("L4", "", 121.0),
    ("A10", "", 125.0),
    ("A6000", "", 155.0),
    ("V100", "", 125.0),
    ("T4", "", 65.0),
]


def gpu_peak_tflops(device_name: str) -> float | None:
    """The table's peak for a CUDA device name such as "NVIDIA H100 80GB HBM3"; None when unknown."""
    tokens = set(device_name.replace("-", " ").replace("_", " ").split())
    for model, variant, value in GPU_PEAK_TFLOPS:
        if model in tokens and (not variant or variant in tokens):
            return value
    return None


def peak_tflops(configured: float | None) -> float | None:
    """train.peak_tflops if set, else the table's value for this GPU, else None (CPU, unknown GPU)."""
    if configured:
        return configured
    if torch.cuda.is_available():
        return gpu_peak_tflops(torch.cuda.get_device_name())
    return None
