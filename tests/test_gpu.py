"""The GPU path, proven in one short run: ``scripts/gpu_check.sh`` runs ``pytest -m gpu`` on a machine with a
GPU. Without one, ``scripts/gpu_check.sh --dry-run`` (run by CI) runs the same tests on the CPU with tiny shapes,
so that they cannot rot unseen. The CPU suite deselects them (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from electra_scale.config import load_config
from electra_scale.data.stream import MicroBatch
from electra_scale.engine.masking import draw
from electra_scale.engine.objective import build_objective, sample_tokens
from electra_scale.engine.step import build_engine, global_counts, train_step
from electra_scale.engine.train import StopVote
from electra_scale.infra import launch
from tests.cli import ROOT, run_cli
from tests.test_train import metrics, pretrain_args

pytestmark = pytest.mark.gpu
CUDA = torch.cuda.is_available()
SPECIAL = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
# On the GPU: bf16 and DeepSpeed's FusedAdam (bias_correction=false, compiled there at first use). On CPU the
# same code in fp32 with torch's AdamW (DeepSpeed's CPU Adam would take a minute to compile).
PRECISION = "bf16" if CUDA else "fp32"
OPTIM = ["optim.bias_correction=false"] if CUDA else ["optim.bias_correction=true"]


@pytest.fixture(scope="module")
def device():
    """One rank, initialised as train.py does it (NCCL on a GPU, gloo on CPU)."""
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    saved = {k: os.environ.get(k) for k in [*env, "MASTER_PORT"]}
    os.environ.update(env, MASTER_PORT=str(launch.free_port()))
    try:
        dev = launch.init_distributed(launch.detect())
    finally:  # the CLI runs below start their own processes: they must not see this one's rank
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    yield dev
    dist.destroy_process_group()


def micro_batch(vocab: int, m: int = 4, seq: int = 64, seed: int = 0) -> MicroBatch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([seq, seq - 9, seq, 20][:m] + [seq] * max(0, m - 4))
    tokens = torch.randint(5, vocab, (m, seq), generator=g)
    tokens = torch.where(torch.arange(seq)[None, :] < lengths[:, None], tokens, SPECIAL["pad"])
    tokens[:, 0] = SPECIAL["cls"]
    tokens[torch.arange(m), lengths - 1] = SPECIAL["sep"]
    return MicroBatch(
        tokens=tokens.to(torch.int32),
        lengths=lengths,
        first_sep=lengths - 1,
        candidates=lengths - 2,
        positions=torch.arange(m) + 1000 * seed,
        samples=torch.arange(m),
    )


def test_nccl_with_the_gloo_side_group(device):
    """The default group (NCCL) carries device tensors, the gloo side group host numbers; the loss denominators
    go over the first without the host waiting, and the stop vote over the second, a step behind."""
    assert device.type == ("cuda" if CUDA else "cpu")
    assert dist.get_backend() == ("nccl" if CUDA else "gloo")
    t = torch.arange(3.0, device=device)
    dist.all_reduce(t)
    assert t.tolist() == [0.0, 1.0, 2.0]
    side = dist.new_group(backend="gloo")
    h = torch.tensor([5.0])
    dist.all_reduce(h, group=side)
    assert h.item() == 5.0
    totals = global_counts([(3, 10), (4, 20)], device)
    assert totals["n_masked"].device.type == device.type and totals["n_tokens"].item() == 30
    vote = StopVote(side)
    # (some rank asked to stop, the lease was lost), as of the previous vote
    assert vote.cast(False) == (False, False) and vote.cast(True) == (False, False) and vote.close() == (True, False)


def test_a_step_in_the_runs_precision_with_deepspeeds_adam(device, monkeypatch):
    """A bf16 ZeRO-2 step with FusedAdam (JIT-built on the GPU), gradients accumulated in fp32 over 2
    micro-batches, built and stepped as train.py does it; losses finite and falling."""

    monkeypatch.setenv("LOCAL_RANK", "0")  # DeepSpeed's engine reads it
    cfg = load_config(
        "configs/tiny.yaml",
        [f"train.precision={PRECISION}", "train.global_batch_size=8", "train.micro_batch_size=4", *OPTIM]
        + ["optim.warmup_steps=2", "train.max_steps=20"],
    )
    torch.manual_seed(0)
    engine = build_engine(cfg, build_objective(cfg, SPECIAL), 1, device)
    if CUDA:
        assert "FusedAdam" in type(engine.optimizer.optimizer).__name__
        assert engine.optimizer.gradient_accumulation_dtype == torch.float32
    losses = []
    for step in range(6):
        batches = [micro_batch(cfg.model.vocab_size, seed=step * 2 + k) for k in range(2)]
        outs = train_step(engine, batches, cfg, device, 1)
        losses.append(sum(float(o["gen_loss"] / o["n_masked"] + 50 * o["disc_loss"] / o["n_tokens"]) for o in outs))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    engine.destroy()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sampling_is_nan_free_and_the_random_numbers_match_the_cpus(device, dtype):
    positions = torch.arange(64) + 10**9
    on_cpu, on_device = draw(7, positions, 128, 19), draw(7, positions.to(device), 128, 19)
    for field in ("order", "kind", "token", "sample"):
        assert torch.equal(getattr(on_cpu, field), getattr(on_device, field).cpu()), field
    logits = (torch.randn(64, 19, 30522, generator=torch.Generator().manual_seed(0)) * 30).to(dtype)
    logits[0, 0] = torch.finfo(dtype).max
    sampled = sample_tokens(logits.to(device), 1.0, on_device.sample)
    assert sampled.dtype == torch.long and ((sampled >= 0) & (sampled < 30522)).all()


def test_checkpoint_resume_is_exact_with_the_devices_rng_and_exports(shards, tmp_path):
    """Dropout on: 6 steps straight, and 3 + 3 across a checkpoint, give the same losses (the RNG state of
    the device included); the export loads and runs on the device."""
    common = ("train.max_steps=6", "checkpoint.every_steps=3", f"train.precision={PRECISION}", *OPTIM)
    common += ("train.deterministic=true", "data.num_workers=1")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_cli(pretrain_args(shards, str(straight), *common))
    run_cli([*pretrain_args(shards, str(resumed), *common), "train.stop_at_step=3"])
    log = run_cli(pretrain_args(shards, str(resumed), *common)).stderr
    assert "at step 3" in log
    assert [m["loss"] for m in metrics(str(resumed))] == [m["loss"] for m in metrics(str(straight))]
    rng = torch.load(resumed / "checkpoints" / "step_0000003" / "rng" / "rank_0.pt", weights_only=False)
    assert ("cuda" in rng) == CUDA

    out = tmp_path / "export"
    subprocess.run([sys.executable, "-m", "electra_scale", "export", str(straight), str(out)], cwd=ROOT, check=True)
    from transformers import ElectraForPreTraining

    model = ElectraForPreTraining.from_pretrained(out / "discriminator").to("cuda" if CUDA else "cpu").eval()
    ids = torch.tensor([[2, 10, 11, 12, 3]], device=model.device)
    assert torch.isfinite(model(input_ids=ids).logits).all()
    assert json.loads((out / "discriminator" / "config.json").read_text())["pad_token_id"] == 0


def _padded_and_unpadded(objective, mb, cfg, device):
    """The objective's loss sums on one micro-batch, padded and padding-free, with their gradients."""
    from electra_scale.engine.step import objective_inputs

    results = []
    for unpad in (False, True):
        cfg.train.unpad = unpad
        objective.zero_grad(set_to_none=True)
        out = objective(**objective_inputs(mb, cfg, device))
        (out["gen_loss"] / out["n_masked"] + 50 * out["disc_loss"] / out["n_tokens"]).backward()
        grads = torch.cat([p.grad.float().flatten() for p in objective.parameters() if p.grad is not None])
        results.append(({k: float(v.detach()) for k, v in out.items() if v.numel() == 1}, grads))
        results[-1][0]["hist_replaced"] = float(out["disc_hist"].view(2, -1)[1].sum())  # the AUC's, per class
        results[-1][0]["hist_original"] = float(out["disc_hist"].view(2, -1)[0].sum())
    return results


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_padding_free_batches_match_padded_ones_on_the_device(device, dropout):
    """Short examples (half the positions padding): the padding-free step (FlashAttention's variable-length
    kernel on a GPU, in bf16; per-example SDPA on CPU, fp32) gives the padded step's losses and gradients, to
    bf16's rounding on a GPU. With attention dropout on, the varlen kernel's dropout path runs and trains."""
    cfg = load_config(
        "configs/tiny.yaml",
        [f"model.dropout={dropout}", f"model.attention_dropout={dropout}", "model.vocab_size=512"],
    )
    torch.manual_seed(0)
    objective = build_objective(cfg, SPECIAL).to(device)
    if CUDA:
        objective = objective.to(torch.bfloat16)
    mb = micro_batch(512, m=8, seq=128, seed=3)
    mb.lengths = torch.tensor([128, 20, 64, 9, 100, 33, 50, 12])
    (padded, g_padded), (unpadded, g_unpadded) = _padded_and_unpadded(objective, mb, cfg, device)
    assert all(torch.isfinite(torch.tensor(list(unpadded.values())))) and torch.isfinite(g_unpadded).all()
    for key in ("n_masked", "n_tokens", "n_replaced", "hist_replaced", "hist_original"):
        if dropout == 0.0:
            assert unpadded[key] == padded[key], key
    if dropout == 0.0:
        rel = 2e-2 if CUDA else 1e-5
        for key in ("gen_loss", "disc_loss"):
            assert unpadded[key] == pytest.approx(padded[key], rel=rel), key
        cos = torch.nn.functional.cosine_similarity(g_padded, g_unpadded, dim=0)
        assert cos > (0.99 if CUDA else 1 - 1e-6), float(cos)


def test_padding_free_ops_fake_outputs_are_torchs_own(device):
    """What torch.compile traces the varlen custom op with (its fake impl) has the exact shapes and dtypes of the
    kernel it calls, rng_state included: torch's meta kernel for that call, in the torch installed (the layout
    changed in 2.7, pytorch#146372, and differs on ROCm). On a GPU also against the real kernel's outputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import electra_scale.engine.packing  # noqa: F401  (registers the op)

    def layout(tensors):
        return [(tuple(t.shape), t.dtype) for t in tensors]

    def call(q, cu):
        return torch.ops.electra_scale.varlen_attention(q, q, q, cu, 6, 0.1, 0.25)

    with FakeTensorMode():  # CUDA tensors without a GPU: the fake path, as the compiler traces it
        q = torch.empty(10, 2, 16, device="cuda", dtype=torch.bfloat16)
        cu = torch.tensor([0, 4, 10], dtype=torch.int32, device="cuda")
        fake = layout(call(q, cu))
        meta = layout(torch.ops.aten._flash_attention_forward(q, q, q, cu, cu, 6, 6, 0.1, False, False, scale=0.25))
    assert fake == meta[:4] and fake[0] == ((10, 2, 16), torch.bfloat16) and fake[1] == ((2, 10), torch.float32)
    if CUDA:
        q = torch.randn(10, 2, 16, device=device, dtype=torch.bfloat16)
        assert layout(call(q, torch.tensor([0, 4, 10], dtype=torch.int32, device=device))) == fake


def test_compiled_layers_train_like_eager_ones(device):
    """train.compile (regional: each encoder layer) on padding-free batches of changing length: the same losses
    as eager, no graph break at the attention (a custom op), and the compiled graphs serve every layer and
    length (dynamic shapes). Inductor on a GPU; on CPU (the dry run) the same plumbing with dynamo's aot_eager
    backend (train.compile_backend), since inductor's C++ build takes minutes on two cores."""
    from torch._dynamo.utils import counters

    from electra_scale.engine.model import prepare_encoders
    from electra_scale.engine.step import objective_inputs

    cfg = load_config(
        "configs/tiny.yaml",
        ["model.dropout=0", "model.attention_dropout=0", "model.vocab_size=512", "train.unpad=true"]
        + ([] if CUDA else ["train.compile_backend=aot_eager"]),
    )
    torch.manual_seed(0)
    eager = build_objective(cfg, SPECIAL).to(device)
    torch.manual_seed(0)
    compiled = build_objective(cfg, SPECIAL).to(device)
    cfg.train.compile = True
    prepare_encoders(compiled, cfg.train)
    if CUDA:
        eager, compiled = eager.to(torch.bfloat16), compiled.to(torch.bfloat16)
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    for seed in range(3):  # three lengths: no recompile per length
        mb = micro_batch(512, m=4, seq=128, seed=seed)
        mb.lengths = torch.tensor([128, 20 + seed * 7, 64, 9 + seed])
        a, b = (m(**objective_inputs(mb, cfg, device)) for m in (eager, compiled))
        for key in ("gen_loss", "disc_loss"):
            assert float(b[key].detach()) == pytest.approx(float(a[key].detach()), rel=2e-2 if CUDA else 1e-5)
        (b["gen_loss"] + b["disc_loss"]).backward()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[-1] == graphs[0], graphs  # compiled at the first length, reused after
    assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])
