"""FLOP counting: a hand count, torch's own count of a real training step, the ELECTRA paper's published totals,
and the GPU peak table that turns FLOPs into MFU."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from electra_scale import cli
from electra_scale.config import load_config
from electra_scale.engine import model as model_mod
from electra_scale.engine.model import flops_per_token, gpu_peak_tflops, paper_flops_per_token
from electra_scale.engine.objective import build_objective, training_loss

SPECIAL = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}


def test_flops_per_token_matches_a_hand_count():
    """configs/tiny.yaml: V 4096, e = h = 64, 2 layers, FFN 256, generator h 32 / FFN 128, s 128, 15% masked."""
    disc_layer = 8 * 64 * 64 + 4 * 128 * 64 + 4 * 64 * 256  # QKVO, scores + weighted sum, FFN (2 FLOPs/MAC)
    gen_layer = 8 * 32 * 32 + 4 * 128 * 32 + 4 * 32 * 128
    disc = 2 * disc_layer + (2 * 64 * 64 + 2 * 64)  # + the discriminator head at every token
    gen = 2 * gen_layer + 2 * 64 * 32  # + the embedding (64) -> generator hidden (32) projection
    gen_head = 0.15 * (2 * 32 * 64 + 2 * 64 * 4096)  # dense h -> e and e -> V, at the masked 15% only
    assert disc_layer == 131_072 and gen_layer == 40_960
    expected = 3 * (disc + gen + gen_head)  # backward = 2 x forward
    assert flops_per_token(load_config("configs/tiny.yaml")) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(1_307_212.8)

    mlm = load_config("configs/tiny.yaml", ["objective.kind=mlm"])
    assert flops_per_token(mlm) == pytest.approx(3 * (2 * disc_layer + 0.15 * (2 * 64 * 64 + 2 * 64 * 4096)))


@pytest.mark.parametrize("kind", ["electra", "mlm"])
def test_flops_per_token_is_what_torch_counts_in_a_training_step(kind, monkeypatch):
    """torch's FlopCounterMode over a real forward + backward of the objective equals the formula exactly.

    Eager attention, so that the attention matmuls are visible to the counter (it has no formula for the CPU
    SDPA kernel); 25% masking of 128 tokens is exactly 32 positions, the slots the code projects."""
    monkeypatch.setattr(model_mod, "ATTENTION", "eager")
    cfg = load_config("configs/tiny.yaml", [f"objective.kind={kind}", "objective.mask_prob=0.25"])
    torch.manual_seed(0)
    objective = build_objective(cfg, SPECIAL)
    batch, seq = 2, cfg.data.seq_len
    ids = torch.randint(5, cfg.model.vocab_size, (batch, seq))
    ids[:, 0], ids[:, -1] = SPECIAL["cls"], SPECIAL["sep"]
    mask, types = torch.ones_like(ids), torch.zeros_like(ids)
    with FlopCounterMode(display=False) as counter:
        out = objective(ids, mask, types, torch.arange(batch))
        totals = {"n_masked": float(out["n_masked"]), "n_tokens": float(out["n_tokens"])}
        training_loss(out, totals, cfg.objective.disc_weight).backward()
    assert out["n_masked"] == 0.25 * batch * seq
    assert counter.get_total_flops() / (batch * seq) == pytest.approx(flops_per_token(cfg), rel=1e-9)


def test_large_preset_is_2_17_gflop_per_token():
    """Standard accounting, s = 512, 25% masking (the Large preset's), vocab projection at masked positions."""
    cfg = load_config("configs/large.yaml")
    assert cfg.data.seq_len == 512 and cfg.objective.mask_prob == 0.25
    assert flops_per_token(cfg) == pytest.approx(2.17e9, rel=0.02)


def _total(cfg, output_frac=None, steps=None, batch=None):
    steps = steps or cfg.train.max_steps
    batch = batch or cfg.train.global_batch_size
    return paper_flops_per_token(cfg, output_frac) * steps * batch * cfg.data.seq_len


def test_paper_convention_reproduces_the_papers_totals():
    """ELECTRA paper, Table 2: ELECTRA-400K = 7.1e20 (and google-research/electra's flops_computation.py)."""
    large = load_config("configs/large.yaml")  # 400k steps x 2048 x 512
    assert _total(large) == pytest.approx(7.1e20, rel=0.02)  # the 25% the preset masks
    assert _total(large, output_frac=0.15625) == pytest.approx(7.1e20, rel=0.01)  # the reference script's 80/512
    assert _total(large, steps=1_750_000) == pytest.approx(3.1e21, rel=0.02)  # ELECTRA-1.75M
    assert _total(load_config("configs/base.yaml")) == pytest.approx(6.4e19, rel=0.01)
    # The MLM baselines, BERT's schedule: 1M steps x 256.
    bert = {"objective.kind=mlm", "objective.mask_prob=0.15"}
    assert _total(load_config("configs/base.yaml", bert), steps=10**6) == pytest.approx(6.4e19, rel=0.01)
    assert _total(load_config("configs/large.yaml", bert), steps=10**6, batch=256) == pytest.approx(1.9e20, rel=0.01)
    # Per token the conventions differ: dense embedding lookups and every op counted, but backward = forward.
    assert paper_flops_per_token(large) < flops_per_token(large)
    assert paper_flops_per_token(load_config("configs/small.yaml")) > flops_per_token(load_config("configs/small.yaml"))


def test_describe_shows_both_conventions(capsys):
    assert cli.main(["describe", "--config", "configs/large.yaml", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    cfg = load_config("configs/large.yaml")
    assert info["flops_per_token"] == pytest.approx(flops_per_token(cfg))
    assert info["paper_flops_per_token"] == pytest.approx(paper_flops_per_token(cfg))
    assert cli.main(["describe", "--config", "configs/large.yaml"]) == 0
    text = capsys.readouterr().out
    assert "paper convention" in text and "7.167e+20" in text


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("Tesla V100-SXM2-16GB", 125.0),
        ("NVIDIA GeForce RTX 4090", None),  # not in the table: bench falls back to a measured matmul rate
    ],
)
def test_gpu_peak_table(name, peak):
    assert gpu_peak_tflops(name) == peak
