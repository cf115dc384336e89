"""Held-out evaluation (``eval.*``): prepare's held-out documents, the eval set's reader, and evaluations that are
deterministic and leave training's state alone. The end-to-end check (a 2-rank run that evaluates, resumes and
trains bit-identically to one that does not) is tests/test_train.py's exact-resume test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from electra_scale.data.evalset import eval_micro_batches, load_eval_manifest
from electra_scale.data.prepare import held_out, iter_corpus, prepare
from electra_scale.data.shards import DataError, load_manifest

TINY = {"seq_len": 128, "samples_per_shard": 64, "samples_per_block": 16, "progress": False}


def _same_shards(a: str, b: str, *ignore: str) -> None:
    ma, mb = load_manifest(a), load_manifest(b)
    for key in ("created", *ignore):
        setattr(mb, key, getattr(ma, key))
    assert ma.to_json() == mb.to_json()
    for shard in ma.shards:
        assert Path(a, shard.name).read_bytes() == Path(b, shard.name).read_bytes(), shard.name


def test_prepare_holds_out_whole_documents_that_training_never_sees(corpus, shards, tmp_path):
    """--eval-fraction splits by document: the training set is byte for byte a prepare of the kept documents alone,
    the held-out set one of the held-out documents alone. (One vocabulary file throughout: training one, which
    with --eval-fraction sees the kept documents only, breaks its ties differently from run to run.)"""
    out, vocab = str(tmp_path / "split"), f"{shards[0]}/tokenizer.json"
    prepare([str(corpus)], out, vocab, **TINY, eval_fraction=0.2)
    lines = corpus.read_text().splitlines()
    chosen = [held_out(doc, 0.2) for doc in iter_corpus([str(corpus)])]
    assert len(chosen) == len(lines) == 400
    assert 40 <= sum(chosen) <= 120  # a hash below 0.2: about a fifth of the documents
    kept, held = tmp_path / "kept.jsonl", tmp_path / "held.jsonl"
    kept.write_text("".join(f"{line}\n" for line, c in zip(lines, chosen) if not c))
    held.write_text("".join(f"{line}\n" for line, c in zip(lines, chosen) if c))

    prepare([str(kept)], str(tmp_path / "kept"), vocab, **TINY)
    _same_shards(out, str(tmp_path / "kept"))
    # The held-out set: the training tokenizer, and its own example builder (seed + 1).
    prepare([str(held)], str(tmp_path / "held"), vocab, **TINY, seed=12346)
    _same_shards(f"{out}/eval", str(tmp_path / "held"), "seed")  # the manifest records prepare's --seed
    assert load_eval_manifest(f"{out}/eval", load_manifest(out)).num_samples > 0


def test_bad_eval_inputs_are_one_line_errors(corpus, shards, tmp_path):
    from electra_scale.cli import main

    assert main(["prepare", "--input", str(corpus), "--output", str(tmp_path / "x"), "--tokenizer", "train:300",
                 "--eval-fraction", "1.5"]) == 2  # fmt: skip
    assert not (tmp_path / "x" / "manifest.json").exists()
    with pytest.raises(DataError, match="held out none of the documents"):
        prepare([str(corpus)], str(tmp_path / "few"), "train:300", **TINY, eval_fraction=1e-9)
    assert not (tmp_path / "few" / "manifest.json").exists()
    # A held-out set of another tokenizer (its own trained vocabulary) is refused, naming the fix.
    other = str(tmp_path / "other")
    prepare([str(corpus)], other, "train:200", **TINY, eval_fraction=0.1)
    with pytest.raises(DataError, match="another tokenizer than data.shards.*--tokenizer"):
        load_eval_manifest(f"{other}/eval", load_manifest(shards[0]))
    with pytest.raises(DataError, match="fewer than one example per rank"):
        eval_micro_batches(shards[0], load_manifest(shards[0]), 3, rank=0, world_size=4, micro_batch_size=2)


def test_the_eval_set_is_cut_the_same_on_any_world_size(shards):
    """Every rank gets as many micro-batches (ZeRO-3's forward is a collective), of about micro_batch_size
    examples, and together they are the first N examples of the set in order, as one rank reads them."""
    prefix, manifest = shards[0], load_manifest(shards[0])
    one, n = eval_micro_batches(prefix, manifest, 50, rank=0, world_size=1, micro_batch_size=8)
    assert n == 50 and [len(mb.positions) for mb in one] == [8] + [7] * 6  # ceil(50 / 8) = 7 pieces
    ranks = [eval_micro_batches(prefix, manifest, 50, rank=r, world_size=3, micro_batch_size=8)[0] for r in range(3)]
    assert len({len(b) for b in ranks}) == 1
    cat = [mb for batches in ranks for mb in batches]
    assert [int(p) for mb in cat for p in mb.positions] == list(range(50))
    for field in ("tokens", "lengths", "first_sep", "candidates"):
        whole = torch.cat([getattr(mb, field) for mb in one])
        assert torch.equal(torch.cat([getattr(mb, field) for mb in cat]), whole), field


def test_two_evaluations_of_the_same_weights_give_the_same_record(shards, eval_shards, tmp_path):
    """The same weights evaluated twice give the same record to the last bit, although the config has dropout on
    (eval mode turns it off) and training's RNG moves in between; another eval.seed masks other tokens (so the
    comparison can tell); torch's RNG state and the train mode come back as they were. One process, the objective
    itself (the DeepSpeed engine's path runs in tests/test_train.py's 2-rank run)."""
    from electra_scale.config import load_config
    from electra_scale.engine.evaluate import Evaluator
    from electra_scale.engine.objective import build_objective

    overrides = [f"data.shards={shards[0]}", f"model.vocab_size={shards[1]}", f"eval.shards={eval_shards}"]
    overrides += ["eval.examples=24", "train.micro_batch_size=8", f"run.output_dir={tmp_path / 'run'}"]
    cfg = load_config("configs/tiny.yaml", overrides)
    manifest = load_manifest(shards[0])
    torch.manual_seed(0)
    objective = build_objective(cfg, manifest.special_ids)
    evaluator = Evaluator(cfg, manifest, 0, 1, torch.device("cpu"))

    def record() -> dict:
        rec = evaluator.run(objective, 1)
        rec.pop("eval_time_s")
        return rec

    state = torch.get_rng_state()
    first = record()
    assert torch.equal(state, torch.get_rng_state()) and objective.training
    torch.rand(100)  # training's RNG moves on between evaluations
    assert record() == first
    assert first["examples"] == 24 and 0 < first["disc_auc"] < 1
    cfg.eval.seed += 1
    assert record()["gen_loss"] != first["gen_loss"]
