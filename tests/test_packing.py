"""Padding-free micro-batches (train.unpad, engine/packing.py): the same objective, losses and gradients as the
padded layout, on batches of short examples; then through the real CLI: 2 ranks unpadded = 1 rank padded, and
an unpadded run that stops and resumes = the same run straight through."""

from __future__ import annotations

import json
import random

import pytest
import torch
from test_objective import SPECIAL, VOCAB, make_batch, word_table
from test_train import metrics, pretrain_args
from torch.utils.flop_counter import FlopCounterMode

from electra_scale.config import load_config
from electra_scale.data import prepare
from electra_scale.engine.masking import max_predictions, predictions_for
from electra_scale.engine.model import training_flops
from electra_scale.engine.objective import build_objective, training_loss
from electra_scale.engine.packing import pack
from tests.cli import run_cli

NO_DROPOUT = ("model.dropout=0", "model.attention_dropout=0")


def test_pack_lays_out_tokens_slots_and_sequence_bounds():
    lengths, used = torch.tensor([3, 1, 4]), torch.tensor([1, 0, 2])
    p = pack(lengths, used, seq_len=5, slots_per_example=2, device="cpu")
    assert p.tokens.tolist() == [0, 1, 2, 5, 10, 11, 12, 13]  # rows of 5: example 1 starts at 5, example 2 at 10
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 0, 1, 2, 3]]
    assert p.cu_seqlens.tolist() == [0, 3, 4, 8] and p.cu_seqlens.dtype == torch.int32
    assert p.slots.tolist() == [0, 4, 5]  # rows of 2 slots: example 0's first, example 2's two
    # The kernel's bound is the padded length, the same every batch (a compiled layer sees one constant), and
    # the packing holds nothing per length: the CPU's grouping is its attention's own (packing.py).
    assert p.max_seqlen == 5 and isinstance(p.max_seqlen, int)
    assert sorted(vars(p)) == ["cu_seqlens", "max_seqlen", "position_ids", "slots", "tokens"]


def _varlen_inputs(lengths, heads=2, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q, k, v = (torch.randn(T, heads, d, generator=g, dtype=dtype, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


def test_the_varlen_ops_cpu_implementation_is_per_example_attention_with_its_gradients():
    """electra_scale::varlen_attention on the CPU (the reference the CUDA kernel stands in for) against plain
    attention example by example, in float64: outputs, logsumexp and the three gradients through its registered
    backward; with dropout, the backward replays the forward's mask (torch.autograd.gradcheck)."""
    from electra_scale.engine.packing import varlen_attention

    lengths = [5, 1, 7, 5, 3]
    q, k, v, cu = _varlen_inputs(lengths)
    out, lse, _, _ = varlen_attention(q, k, v, cu, 7, 0.0, 0.3)
    expected, expected_lse, start = [], [], 0
    for n in lengths:
        qi, ki, vi = (x[start : start + n].transpose(0, 1) for x in (q, k, v))  # [heads, n, d]
        scores = qi @ ki.transpose(-1, -2) * 0.3
        expected.append((scores.softmax(-1) @ vi).transpose(0, 1))
        expected_lse.append(scores.logsumexp(-1))
        start += n
    expected = torch.cat(expected)
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(lse.double(), torch.cat(expected_lse, dim=1), rtol=1e-6)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    theirs = torch.autograd.grad(expected, (q, k, v), grad)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)

    def dropped(q, k, v):  # the same seed drawn at every call: a function gradcheck can differentiate
        torch.manual_seed(0)
        return varlen_attention(q, k, v, cu, 7, 0.5, 0.3)[0]

    assert not torch.allclose(dropped(q, k, v), out)  # some weights were dropped
    assert torch.autograd.gradcheck(dropped, (q, k, v))  # the backward replays the forward's mask


def test_the_varlen_contract_is_checked_before_the_call():
    """What aten::_flash_attention_forward's variable-length path wants (docs/gpu.md), refused in one line on
    any device: contiguous [T, heads, d] q/k/v, int32 cu_seqlens, a Python int bound."""
    from electra_scale.engine.packing import check_varlen

    q, k, v, cu = (x.detach() for x in _varlen_inputs([3, 4], dtype=torch.float32))
    check_varlen(q, k, v, cu, 4)
    cases = {
        "contiguous": (q.transpose(0, 1).contiguous().transpose(0, 1), k, v, cu, 4),
        "int32": (q, k, v, cu.long(), 4),
        "Python int": (q, k, v, cu, torch.tensor(4)),
        "one shape": (q[:, :1], k, v, cu, 4),
        "multiple of 8": (q[..., :6].contiguous(), k[..., :6].contiguous(), v[..., :6].contiguous(), cu, 4),
    }
    for words, args in cases.items():
        with pytest.raises(ValueError, match=words):
            check_varlen(*args)


def test_a_compiled_layer_traces_the_varlen_op_into_one_graph():
    """train.compile on padding-free batches: the attention is a custom op with a fake implementation, so each
    compiled encoder layer is one graph with no break, reused across batches of other lengths (dynamic shapes);
    forward and backward as eager's. aot_eager traces what inductor would compile, without generating code."""
    from torch._dynamo.utils import counters

    from electra_scale.engine.model import build_electra

    cfg = load_config("configs/tiny.yaml", ["model.dropout=0", "model.attention_dropout=0", "train.unpad=true"])
    torch.manual_seed(0)
    _, disc = build_electra(cfg.model)
    layer = disc.electra.encoder.layer[0]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(layer, backend="aot_eager", dynamic=True)
    for lengths in ([9, 30, 17], [64, 3, 12, 40], [5, 5]):
        packing = pack(torch.tensor(lengths), torch.ones(len(lengths)), 128, 20, "cpu")
        x = torch.randn(1, sum(lengths), cfg.model.hidden_size, requires_grad=True)
        eager_out = layer(x, packing=packing)[0]
        compiled_out = compiled(x, packing=packing)[0]
        assert torch.allclose(compiled_out, eager_out, rtol=1e-5, atol=1e-6)
        g_eager, g_compiled = (torch.autograd.grad(o.square().sum(), x)[0] for o in (eager_out, compiled_out))
        assert torch.allclose(g_compiled, g_eager, rtol=1e-4, atol=1e-6)
    assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def _objective_inputs(ids, attn, cfg, unpad: bool) -> dict:
    L, p = ids.shape[1], cfg.objective.mask_prob
    x = dict(input_ids=ids, attention_mask=attn, token_type_ids=torch.zeros_like(ids), positions=torch.arange(len(ids)))
    if unpad:
        lengths = attn.sum(-1)
        candidates = ((ids > SPECIAL["mask"]) & attn.bool()).sum(-1)  # make_batch: ids above the specials
        x["packing"] = pack(lengths, predictions_for(lengths, candidates, p, L), L, max_predictions(p, L), "cpu")
    return x


def _step(objective, x, disc_weight):
    objective.zero_grad(set_to_none=True)
    out = objective(**x)
    loss = training_loss(out, {"n_masked": out["n_masked"], "n_tokens": out["n_tokens"]}, disc_weight)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}
    sums = {k: float(v.detach()) for k, v in out.items() if k != "disc_hist"}
    return sums, float(loss.detach()), grads, out.get("disc_hist")


@pytest.mark.parametrize(
    "overrides",
    [
        ["objective.kind=electra"],
        ["objective.kind=mlm"],
        ["objective.embedding_sharing=gdes"],
        ["objective.whole_word_mask=true"],
    ],
    ids=["electra", "mlm", "gdes", "whole-word"],
)
def test_unpadded_objective_equals_the_padded_one(overrides):
    """fp32, dropout off, examples of 8-64 tokens padded to 128 (about 70% padding): every loss and metric sum,
    and every gradient, agree to float rounding."""
    cfg = load_config("configs/tiny.yaml", [f"model.vocab_size={VOCAB}", *NO_DROPOUT, *overrides])
    continuation = torch.nonzero(word_table()).flatten().tolist() if cfg.objective.whole_word_mask else None
    torch.manual_seed(0)
    objective = build_objective(cfg, SPECIAL, continuation)
    ids, attn = make_batch(8, 128, seed=11, min_len=8)
    ids, attn = ids[:, :128], attn[:, :128]
    long = attn.sum(-1) > 64  # shorten: short documents are what padding-free batches are for
    attn[long, 64:] = 0
    ids = ids * attn
    assert 1 - attn.float().mean() > 0.5
    padded = _step(objective, _objective_inputs(ids, attn, cfg, unpad=False), cfg.objective.disc_weight)
    unpadded = _step(objective, _objective_inputs(ids, attn, cfg, unpad=True), cfg.objective.disc_weight)
    for key, value in padded[0].items():
        assert unpadded[0][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert unpadded[1] == pytest.approx(padded[1], rel=1e-5)
    assert padded[0]["n_masked"] > 0 and padded[1] > 0
    assert padded[2].keys() == unpadded[2].keys()
    if cfg.objective.kind == "electra":
        # The AUC's histograms: padding adds nothing, so both layouts count the same tokens in the same bins.
        # (Identical on the machine that wrote this; logits that agree to float rounding may still put a token
        # lying on a bin edge into its neighbour, hence "at most one token moved one bin".)
        hp, hu = padded[3].view(2, -1), unpadded[3].view(2, -1)
        assert torch.equal(hp.sum(-1), hu.sum(-1)) and float(hp.sum()) == float(attn.sum())
        assert float((hp.cumsum(-1) - hu.cumsum(-1)).abs().max()) <= 1.0
    scale = max(float(g.abs().max()) for g in padded[2].values())
    for name, grad in padded[2].items():
        # Relative to the largest gradient: some are ~0 by symmetry (a key bias shifts every score of a query
        # alike, which softmax ignores), and their rounding noise has no scale of its own.
        assert torch.allclose(unpadded[2][name], grad, rtol=1e-4, atol=1e-5 * scale), name


def test_unpadded_flops_are_what_torch_counts():
    """FlopCounterMode over an unpadded training step counts the encoders' and heads' matmuls on the real tokens
    only: training_flops(cfg, T, pairs=0) (the counter has no formula for CPU SDPA, so attention is left out on
    both sides). Lengths are multiples of 4 and 25% is masked: exactly T/4 slots are projected."""
    cfg = load_config("configs/tiny.yaml", ["objective.mask_prob=0.25", *NO_DROPOUT])
    torch.manual_seed(0)
    objective = build_objective(cfg, SPECIAL)
    lengths = [12, 40, 128, 64]
    ids = torch.zeros(4, 128, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(5, cfg.model.vocab_size, (n,))
        ids[b, 0], ids[b, n - 1] = SPECIAL["cls"], SPECIAL["sep"]
        attn[b, :n] = 1
    x = _objective_inputs(ids, attn, cfg, unpad=True)
    with FlopCounterMode(display=False) as counter:
        out = objective(**x)
        training_loss(out, {"n_masked": float(out["n_masked"]), "n_tokens": float(out["n_tokens"])}, 50.0).backward()
    assert out["n_masked"] == sum(lengths) / 4
    assert counter.get_total_flops() == pytest.approx(training_flops(cfg, sum(lengths), 0.0), rel=1e-9)


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def short_shards(tmp_path_factory) -> tuple[str, int]:
    """Documents of one or two short sentences at seq 128: most positions of every batch are padding."""
    from tests.corpus import WORDS

    rng = random.Random(1)
    path = tmp_path_factory.mktemp("short") / "docs.jsonl"
    with open(path, "w") as f:
        for _ in range(600):
            text = " ".join(" ".join(rng.choices(WORDS, k=rng.randint(3, 14))) + "." for _ in range(rng.randint(1, 2)))
            f.write(json.dumps({"text": text}) + "\n")
    out = str(tmp_path_factory.mktemp("short-shards") / "shards")
    manifest = prepare([str(path)], out, "train:300", seq_len=128, samples_per_shard=64, samples_per_block=16)
    return out, manifest.vocab_size


def test_unpadded_pretraining_matches_padded_across_world_sizes_and_a_resume(short_shards, tmp_path):
    """Through the CLI, dropout off: an unpadded 2-rank run, stopped at step 2 and resumed, logs the losses of a
    padded 1-rank run straight through (to the world-size tolerance). Resume is exact whatever the layout
    (test_train covers it bit for bit); here it must carry the unpadded run on as if never stopped."""
    common = ("train.max_steps=4", "checkpoint.every_steps=2", *NO_DROPOUT)
    padded, unpadded = str(tmp_path / "padded"), str(tmp_path / "unpadded")
    run_cli(pretrain_args(short_shards, padded, *common, "train.micro_batch_size=8"))
    run_cli(pretrain_args(short_shards, unpadded, *common, "train.unpad=true", "train.stop_at_step=2"), ranks=2)
    assert [m["step"] for m in metrics(unpadded)] == [1, 2]
    second = run_cli(pretrain_args(short_shards, unpadded, *common, "train.unpad=true"), ranks=2)
    assert "at step 2" in second.stderr
    a, b = metrics(padded), metrics(unpadded)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in ("loss", "gen_loss", "disc_loss", "disc_acc", "gen_acc"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (x["step"], key)
        # Throughput counts real tokens: the padding share is reported, and most of these batches are padding.
        assert y["pad_frac"] == pytest.approx(x["pad_frac"]) and x["pad_frac"] > 0.5
    assert a[-1]["loss"] < a[0]["loss"]


def test_the_padding_free_step_has_no_host_sync_outside_the_attention():
    """On a GPU every host sync stalls the step. scripts/step_profile.py counts them in one forward and backward
    (torch.profiler: .item()/.tolist(), nonzero, boolean-mask indexing); the padding-free step's only ones are
    inside the varlen op's CPU implementation, which reads the example lengths on the host where the GPU's
    FlashAttention kernel reads them on the device. The rest of the step, the same code on both, has none."""
    import importlib.util

    from electra_scale.config import load_config as load

    spec = importlib.util.spec_from_file_location("step_profile", "scripts/step_profile.py")
    step_profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step_profile)
    cfg = load("configs/tiny.yaml", ["train.unpad=true", "model.vocab_size=512"])
    report = step_profile.profile_step(cfg, 8, torch.device("cpu"))
    assert report["cpu_reference_attention_syncs"] > 0  # the profile does see syncs where there are some
    assert report["host_syncs"] == 0, report["syncs_by_op"]
