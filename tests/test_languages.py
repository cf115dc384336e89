"""Every tokenizer convention on real non-Latin text (issue 30): Russian and Chinese manual pages (tests/data/
languages/) prepared with a trained WordPiece (##), Unigram (Metaspace ▁) and byte-level BPE (Ġ) vocabulary.
Whole-word masking keeps every word whole and never joins two (checked against tests/languages.py's oracle, which
reads the words off the text, not the vocabulary's marks), spends the objective's budget, resumes exactly, and the
export's tokenizer reloads with transformers and encodes the same ids. A SentencePiece model directory (as
DeBERTa-v3 and XLM-R ship) is converted, its special tokens mapped by their roles."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers

from electra_scale.config import ConfigError, load_config
from electra_scale.data.prepare import prepare
from electra_scale.data.shards import Manifest
from electra_scale.data.tokenizer import load_tokenizer, special_ids, special_roles
from electra_scale.data.words import WordConventionError, continuation_ids, warn_if_unsegmented, word_convention
from electra_scale.engine.masking import num_to_predict
from electra_scale.engine.objective import build_objective
from electra_scale.engine.pretrained import check_vocabulary
from electra_scale.engine.train import word_pieces
from tests.cli import run_cli
from tests.languages import CHINESE, MODELS, RUSSIAN, batch, continuation_table, lines, mask, word_figures
from tests.test_train import NO_DROPOUT, metrics, pretrain_args


def _prepare(corpus: Path, out: str, spec: str, **kw) -> tuple[str, int]:
    m = prepare([str(corpus)], out, spec, seq_len=128, samples_per_shard=64, samples_per_block=16, progress=False, **kw)
    return out, m.vocab_size


@pytest.fixture(scope="module", params=list(MODELS))
def model_shards(request, tmp_path_factory) -> tuple[str, str, int]:
    """(model, shard prefix, vocab size): the Russian corpus prepared with a vocabulary of that model, cased."""
    out = str(tmp_path_factory.mktemp(request.param) / "shards")
    return (request.param, *_prepare(RUSSIAN, out, MODELS[request.param], lowercase=False))


def _tok(prefix: str) -> Tokenizer:
    return load_tokenizer(f"{prefix}/tokenizer.json")


def test_trained_vocabularies_put_electras_special_tokens_first_and_record_the_normalisation(model_shards):
    model, prefix, _ = model_shards
    manifest = Manifest.from_dict(json.loads(Path(prefix, "manifest.json").read_text()), prefix)
    assert manifest.special_ids == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    # WordPiece keeps BERT's normaliser (cased: no lowercasing, so no accent stripping); the others NFKC.
    assert manifest.normalization == {"wordpiece": "BertNormalizer()", "unigram": "NFKC", "bpe": "NFKC"}[model]
    assert not manifest.lowercase
    tok = _tok(prefix)
    expected = {"wordpiece": ("continuation prefix", "##"), "unigram": ("word-start mark", "▁")}
    assert word_convention(tok) == expected.get(model, ("word-start mark", "Ġ"))
    # "й" survives (BERT's lowercasing would strip its breve): the text is Russian, not transliterated.
    assert tok.decode(tok.encode("который").ids).replace(" ", "") == "который"


def test_whole_words_on_real_text_are_masked_whole_and_never_joined(model_shards):
    model, prefix, _ = model_shards
    tok = _tok(prefix)
    special = special_ids(tok)
    data = batch(tok, lines(RUSSIAN), special)
    # The masking's words (a piece not in the continuation table starts one) are the oracle's, token for token:
    # no word split in two, no two words joined.
    table = continuation_table(tok, special)
    candidates = data.words >= 0
    starts = candidates & ~(table[data.ids] & F.pad(candidates[:, :-1], (1, 0)))
    oracle = candidates & (data.words != F.pad(data.words[:, :-1], (1, 0), value=-2))
    assert torch.equal(starts, oracle)
    assert int(candidates.sum()) > 1.3 * int(oracle.sum())  # words of several pieces are common, not a trivial pass

    m = mask(tok, data, special, whole_words=True)
    budget = num_to_predict(data.ids, data.attn, special, 0.15)
    for b in range(data.ids.shape[0]):
        used = int(m.weights[b].sum())
        picked = data.words[b, m.positions[b, :used]]
        assert (picked >= 0).all()  # never [CLS]/[SEP]/padding
        for w in picked.unique():
            assert int((picked == w).sum()) == int((data.words[b] == w).sum()), (model, b, int(w))  # all of it
        longest = int(torch.bincount(data.words[b][data.words[b] >= 0]).max())
        assert 0 <= int(budget[b]) - used < longest  # the budget, short by less than a word
    figures = word_figures(data, m)
    assert figures["words_masked_whole"] == 1.0
    # The objective's budget is tokens (mask_prob of each example's); whole words spend it to within a word.
    assert 0.12 < figures["masked_token_share"] <= 0.15
    # Piece masking, for contrast, splits most words of several pieces.
    assert word_figures(data, mask(tok, data, special, whole_words=False))["words_masked_whole"] < 0.6


@pytest.fixture(scope="module")
def straight(model_shards, tmp_path_factory) -> str:
    """4 whole-word steps, checkpoints every 2, dropout off."""
    _, prefix, vocab = model_shards
    out = str(tmp_path_factory.mktemp("straight") / "run")
    run_cli(pretrain_args((prefix, vocab), out, *_whole_word_run()))
    return out


def _whole_word_run() -> tuple[str, ...]:
    return ("train.max_steps=4", "checkpoint.every_steps=2", "objective.whole_word_mask=true", *NO_DROPOUT)


def test_whole_word_runs_resume_exactly(model_shards, straight, tmp_path):
    _, prefix, vocab = model_shards
    args = pretrain_args((prefix, vocab), str(tmp_path / "run"), *_whole_word_run())
    run_cli([*args, "train.stop_at_step=2"])
    run_cli(args)
    one, two = metrics(straight), metrics(str(tmp_path / "run"))
    assert [m["step"] for m in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        for key in ("loss", "gen_loss", "disc_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key)


def test_the_exports_tokenizer_reloads_and_encodes_the_same_ids(model_shards, straight, tmp_path):
    from transformers import AutoTokenizer

    _, prefix, _ = model_shards
    run_cli(["export", straight, str(tmp_path / "hf")])
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf" / "discriminator")
    ours = _tok(prefix)
    special = special_ids(ours)
    for text in lines(RUSSIAN)[:40:7]:
        expected = [special["cls"], *ours.encode(text, add_special_tokens=False).ids, special["sep"]]
        assert hf(text)["input_ids"] == expected
    assert hf.mask_token_id == special["mask"] and hf.pad_token_id == special["pad"]


# ------------------------------------------------------------------------------------- Chinese, refusals
def test_chinese_wordpiece_makes_each_ideograph_a_word_and_the_others_warn(caplog):
    texts = lines(CHINESE)
    for model, spec in MODELS.items():
        tok = load_tokenizer(spec, lambda: iter(texts), lowercase=False)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="electra_scale"):
            warned = warn_if_unsegmented(tok)
        assert warned == (model != "wordpiece"), model
        if warned:
            assert "pre-segment the text with spaces" in caplog.text and "LTP" in caplog.text
        else:
            # BERT's normaliser spaces out every ideograph: each is a word, whole-word masking is masking them.
            ids = tok.encode("这个工具指定", add_special_tokens=False).ids
            assert len(ids) == 6 and not set(ids) & set(continuation_ids(tok))
    # A vocabulary of one-piece words only (no continuation at all) is whole-word masking's trivial case, not an
    # error.
    cfg = load_config("configs/tiny.yaml", ["model.vocab_size=512", "objective.whole_word_mask=true"])
    assert not build_objective(cfg, {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}, []).continuation.any()


def test_a_tokenizer_without_a_word_convention_is_refused_in_one_line(tmp_path):
    tok = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(WordConventionError, match=r"set objective.whole_word_mask=false$"):
        word_convention(tok)
    # A BPE that marks word *ends* (CLIP's </w>) behind a byte-level pre-tokenizer: no Ġ to read.
    clip = Tokenizer(models.BPE({"[UNK]": 0, "a</w>": 1, "b": 2}, [], end_of_word_suffix="</w>", unk_token="[UNK]"))
    clip.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    with pytest.raises(WordConventionError, match="end_of_word_suffix '</w>'"):
        word_convention(clip)
    Path(tmp_path, "tokenizer.json").write_text(tok.to_str())
    cfg = load_config("configs/tiny.yaml", [f"data.shards={tmp_path}", "objective.whole_word_mask=true"])
    with pytest.raises(ConfigError) as err:
        word_pieces(cfg, special_ids(tok))
    assert "\n" not in str(err.value) and "train-unigram:V" in str(err.value)


# ------------------------------------------------------------------------------------- SentencePiece directories
def _sentencepiece_dir(where: Path, name: str, **names) -> Path:
    """A model directory as DeBERTa-v3 (spm.model) or XLM-R (sentencepiece.bpe.model) ship it, trained here on the
    Russian text with the ``sentencepiece`` package (the languages extra)."""
    import sentencepiece

    where.mkdir()
    sentencepiece.SentencePieceTrainer.train(
        input=str(RUSSIAN), model_prefix=str(where / name), vocab_size=1200, minloglevel=2, **names
    )
    (where / f"{name}.vocab").unlink()
    return where


def test_a_debertav3_style_spm_model_is_converted_with_its_own_ids(tmp_path):
    import sentencepiece

    d = _sentencepiece_dir(
        tmp_path / "deberta",
        "spm",
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        pad_piece="[PAD]",
        bos_piece="[CLS]",
        eos_piece="[SEP]",
        unk_piece="[UNK]",
        user_defined_symbols=["[MASK]"],
    )
    prefix, _ = _prepare(RUSSIAN, str(tmp_path / "shards"), str(d), lowercase=False)
    tok, spm = _tok(prefix), sentencepiece.SentencePieceProcessor(model_file=str(d / "spm.model"))
    for text in lines(RUSSIAN)[:50:5]:
        assert tok.encode(text, add_special_tokens=False).ids == spm.encode(text)
    assert special_ids(tok) == {"pad": 0, "cls": 1, "sep": 2, "unk": 3, "mask": 4}
    assert word_convention(tok) == ("word-start mark", "▁")
    check_vocabulary(str(d), prefix)  # init_from such a directory: its vocabulary is the shards'
    other, _ = _prepare(RUSSIAN, str(tmp_path / "other"), "train-unigram:1200", lowercase=False)
    with pytest.raises(ConfigError, match="another vocabulary"):
        check_vocabulary(str(d), other)


def test_an_xlmr_style_vocabulary_maps_its_special_tokens_by_role(tmp_path):
    d = _sentencepiece_dir(tmp_path / "xlmr", "sentencepiece.bpe")
    roles = {"cls_token": "<s>", "sep_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (d / "special_tokens_map.json").write_text(json.dumps({**roles, "mask_token": {"content": "<mask>"}}))
    assert special_roles(str(d))["mask"] == "<mask>"
    prefix, vocab = _prepare(RUSSIAN, str(tmp_path / "shards"), str(d), lowercase=False)
    manifest = json.loads(Path(prefix, "manifest.json").read_text())
    # fairseq's order (<s> <pad> </s> <unk>, the pieces one id up) and <mask> last, as XLM-R's checkpoints have it.
    assert manifest["special_ids"] == {"pad": 1, "unk": 3, "cls": 0, "sep": 2, "mask": vocab - 1}
    check_vocabulary(str(d), prefix)
    # Without the roles, the vocabulary is refused in one line naming what is missing.
    with pytest.raises(ValueError, match=r"lacks the special token\(s\) \[PAD\] \[UNK\] \[CLS\] \[SEP\] \[MASK\]"):
        special_ids(_tok(prefix))


def test_without_the_languages_extra_a_sentencepiece_model_is_refused_naming_it(tmp_path, monkeypatch):
    d = _sentencepiece_dir(tmp_path / "deberta", "spm")
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # the package not installed: import fails
    with pytest.raises(ValueError, match=r"needs the languages extra: pip install 'electra-scale\[languages\]'"):
        load_tokenizer(str(d))
