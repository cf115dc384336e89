"""What ELECTRA users ask for (issue 11), end to end through the CLI: continuing pretraining from an exported
model, gradient-disentangled embedding sharing through export, and whole-word masking with the generator
curriculum on 2 ranks and across a resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from electra_scale.config import ConfigError
from tests.cli import run_cli
from tests.test_train import NO_DROPOUT, metrics, pretrain_args


@pytest.fixture(scope="module")
def original(shards, tmp_path_factory) -> tuple[str, str]:
    """A tiny run of 12 steps and its export: what a user would download."""
    base = tmp_path_factory.mktemp("original")
    run = str(base / "run")
    run_cli(pretrain_args(shards, run, "train.max_steps=12", "checkpoint.every_steps=12", "optim.warmup_steps=3"))
    run_cli(["export", run, str(base / "hf")])
    return run, str(base / "hf")


def continue_args(shards, hf: str, out: str, *overrides: str) -> list[str]:
    """The user's command: the original's config (the tiny preset, the shards' vocabulary) and init_from."""
    return [
        *pretrain_args(shards, out, *overrides),
        f"model.init_from={hf}/discriminator",
        f"model.init_generator_from={hf}/generator",
    ]


def test_continued_pretraining_carries_on_from_the_export(shards, original, tmp_path):
    run, hf = original
    before = metrics(run)
    out = str(tmp_path / "continued")
    args = continue_args(shards, hf, out, "train.max_steps=2", "checkpoint.every_steps=2", "optim.warmup_steps=1")
    proc = run_cli(args)
    assert "initialised the discriminator from" in proc.stderr and "initialised the generator from" in proc.stderr
    after = metrics(out)
    fresh, last, first = before[0]["loss"], before[-1]["loss"], after[0]["loss"]
    print(f"fresh first loss {fresh:.4f}, original's last {last:.4f}, continued first {first:.4f}")
    # The continued run's first loss is the original's last (other examples: close, not equal), far below a
    # fresh start's.
    assert abs(first - last) < 0.25 * (fresh - last), (fresh, last, first)

    # Its checkpoint wins over init_from when the run goes on.
    more = run_cli([a if a != "train.max_steps=2" else "train.max_steps=3" for a in args])
    assert "model.init_from" in more.stderr and "is not used" in more.stderr and "resumed from" in more.stderr
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]

    # And the result fine-tunes (a linear probe on two word groups that share no word).
    rows = [{"text": f"the river city {i}", "label": "a"} for i in range(12)]
    rows += [{"text": f"green north road {i}", "label": "b"} for i in range(12)]
    for name, part in (("train", rows[::2]), ("dev", rows[1::2])):
        Path(tmp_path, f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    results = tmp_path / "r.json"
    run_cli(
        ["finetune", out, "--train", str(tmp_path / "train.jsonl"), "--dev", str(tmp_path / "dev.jsonl")]
        + ["--probe-only", "--seeds", "1", "--output", str(results)]
    )
    assert json.loads(results.read_text())["probe"]["summary"]["dev"]["accuracy"]["mean"] == 1.0


def test_a_shape_that_disagrees_with_the_export_is_refused(shards, original, tmp_path):
    _, hf = original
    out = tmp_path / "refused"
    proc = run_cli([*continue_args(shards, hf, str(out)), "model.hidden_size=96"], check=False)
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "model.hidden_size=96 in the run config" in line and "config.json has 64" in line
    assert not out.exists()


def test_shards_of_another_vocabulary_are_refused_with_the_prepare_command(shards, original, corpus, tmp_path):
    from electra_scale.data.prepare import prepare
    from electra_scale.engine.pretrained import check_vocabulary

    _, hf = original
    other = str(tmp_path / "other")
    prepare([str(corpus)], other, "train:250", seq_len=128, samples_per_shard=64, progress=False)
    with pytest.raises(ConfigError, match=r"another vocabulary .* electra-scale prepare --tokenizer .*discriminator"):
        check_vocabulary(f"{hf}/discriminator", other)
    check_vocabulary(f"{hf}/discriminator", shards[0])  # the export's own vocabulary passes
    # prepare takes the model directory itself as the tokenizer, and its shards then pass.
    same = str(tmp_path / "same")
    prepare([str(corpus)], same, f"{hf}/discriminator", seq_len=128, samples_per_shard=64, progress=False)
    check_vocabulary(f"{hf}/discriminator", same)


def test_gdes_exports_a_standard_discriminator_with_the_folded_table(shards, tmp_path):
    from transformers import ElectraForMaskedLM, ElectraForPreTraining

    out = str(tmp_path / "gdes")
    common = ("train.max_steps=3", "checkpoint.every_steps=3", "objective.embedding_sharing=gdes")
    run_cli(pretrain_args(shards, out, *common))
    run_cli(["export", out, str(tmp_path / "hf")])
    disc = ElectraForPreTraining.from_pretrained(tmp_path / "hf" / "discriminator")
    gen = ElectraForMaskedLM.from_pretrained(tmp_path / "hf" / "generator")
    state = torch.load(Path(out, "checkpoints", "step_0000003", "mp_rank_00_model_states.pt"), weights_only=False)
    e_g = state["module"]["generator.electra.embeddings.word_embeddings.weight"]
    delta = state["module"]["gdes_delta.weight"]
    assert delta.abs().sum() > 0  # the discriminator trained its own part
    assert torch.allclose(gen.electra.embeddings.word_embeddings.weight, e_g)
    assert torch.allclose(disc.electra.embeddings.word_embeddings.weight, e_g + delta)
    # A run cannot switch its sharing when it resumes.
    proc = run_cli(pretrain_args(shards, out, "train.max_steps=4", "checkpoint.every_steps=4"), check=False)
    assert proc.returncode == 2 and "objective.embedding_sharing='gdes' there, 'shared' here" in proc.stderr


def test_whole_words_and_the_curriculum_give_one_run_on_any_ranks_and_across_a_resume(shards, tmp_path):
    common = (
        "train.max_steps=4",
        "checkpoint.every_steps=2",
        "objective.whole_word_mask=true",
        "objective.temperature_start=3.0",
        "objective.temperature_warmup_steps=3",
        "model.dropout=0",
        "model.attention_dropout=0",
    )
    run_cli(pretrain_args(shards, str(tmp_path / "two"), *common), ranks=2)
    resumed = pretrain_args(shards, str(tmp_path / "one"), *common)
    run_cli([*resumed, "train.stop_at_step=2"])
    run_cli(resumed)
    two, one = metrics(str(tmp_path / "two")), metrics(str(tmp_path / "one"))
    assert [m["step"] for m in one] == [1, 2, 3, 4]
    for a, b in zip(two, one):
        for key in ("loss", "gen_loss", "disc_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key)


def test_init_from_s3_is_downloaded_once_per_node(shards, original, s3_bucket, s3_server, tmp_path):
    """2 ranks on one node continue from an export in S3: each weights file is fetched once (by local rank 0, into
    the node-local cache, removed once loaded), the other rank reads that copy, and the run trains exactly as one
    rank that reads the export from local disk."""
    from electra_scale.infra import storage
    from tests.faultproxy import FaultProxy

    _, hf = original
    remote = f"{s3_bucket}/hf"
    for path in sorted(p for p in Path(hf).rglob("*") if p.is_file()):
        storage.upload_file(path, f"{remote}/{path.relative_to(hf).as_posix()}")
    common = ("train.max_steps=2", "checkpoint.every_steps=2", "optim.warmup_steps=1", *NO_DROPOUT)
    cache = tmp_path / "cache"
    with FaultProxy(s3_server.endpoint) as proxy:  # no faults: it counts the requests
        args = continue_args(shards, remote, f"{s3_bucket}/run", *common, f"run.cache_dir={cache}")
        proc = run_cli(args, ranks=2, env={"AWS_ENDPOINT_URL": proxy.endpoint})
        gets = [r.path for r in proxy.requests if r.method == "GET" and r.path.endswith("/model.safetensors")]
    bucket = s3_bucket.removeprefix("s3://")
    assert sorted(gets) == [f"/{bucket}/hf/{part}/model.safetensors" for part in ("discriminator", "generator")]
    assert "initialised the discriminator from" in proc.stderr and "initialised the generator from" in proc.stderr
    assert not (cache / "init_from").exists(), "the node's copy is removed once every rank has loaded it"

    local = str(tmp_path / "local")
    run_cli(continue_args(shards, hf, local, *common))
    for a, b in zip(metrics(f"{s3_bucket}/run"), metrics(local), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), a["step"]  # 2 ranks sum in another order
