"""Where words begin, for whole-word masking: read from the tokenizer's own model, pre-tokenizer and decoder.

The objective keeps one representation (engine/objective.py ``whole_word_positions``): the set of ids that
*continue* a word. Each tokenizer convention gives it differently:

- WordPiece (and a BPE with ``continuing_subword_prefix``): a piece that starts with the prefix (``##``)
  continues the word, as BERT's ``create_pretraining_data.py --do_whole_word_mask`` reads it.
- Metaspace (SentencePiece Unigram or BPE): a piece that starts with the replacement (``▁``) starts a word; every
  other non-special piece continues one. A bare ``▁`` piece starts a word and the piece after it continues it.
- Byte-level (GPT-2/RoBERTa BPE): ``Ġ`` (the byte-level form of a space) starts a word, likewise.

The word-start conventions are fairseq's ``mask_whole_words`` for RoBERTa/XLM-R (``is_beginning_of_word``): a
punctuation mark written against a word (``файлы,``) is masked with it, where BERT's pre-tokenizer makes it a word
of its own.

Unsegmented scripts (Chinese, Japanese, Thai...) have no word marks. BERT's normaliser puts a space around every
CJK ideograph, so a WordPiece vocabulary (``train:V``, BERT's own) makes each ideograph a word; a Metaspace or
byte-level tokenizer sees a run without spaces as one word. ymcui's Chinese-ELECTRA segments words with LTP
first; electra-scale does not: pre-segment the text with spaces for word-level masking there.
"""

from __future__ import annotations

import json
import logging
import unicodedata

from tokenizers import Tokenizer

log = logging.getLogger("electra_scale")

WORDPIECE, WORD_START = "continuation prefix", "word-start mark"
_BYTE_LEVEL_SPACE = "Ġ"  # GPT-2's byte-to-unicode map sends the space byte (0x20) to U+0120


class WordConventionError(ValueError):
    """The tokenizer's word convention cannot be told: whole-word masking cannot work with it."""


def _components(node) -> list[dict]:
    """A pre-tokenizer/decoder/normalizer node and, for a Sequence, its members."""
    if not isinstance(node, dict):
        return []
    members = node.get("pretokenizers") or node.get("decoders") or node.get("normalizers") or []
    return [node, *(m for sub in members for m in _components(sub))]


def word_convention(tok: Tokenizer) -> tuple[str, str]:
    """(kind, mark): ``(WORDPIECE, "##")`` where a prefix marks a continuation, ``(WORD_START, "▁" or "Ġ")`` where
    a mark starts a word. Raises WordConventionError (one line, naming the fix) when it cannot be told."""
    spec = json.loads(tok.to_str())
    model = spec.get("model") or {}
    parts = _components(spec.get("pre_tokenizer")) + _components(spec.get("decoder"))
    kinds = {p.get("type"): p for p in parts}
    prefix = model.get("continuing_subword_prefix")
    if model.get("type") == "WordPiece" or (model.get("type") == "BPE" and prefix):
        return WORDPIECE, prefix or "##"
    mark = None
    if "Metaspace" in kinds:
        mark = kinds["Metaspace"].get("replacement", "▁")
    elif "ByteLevel" in kinds:
        mark = _BYTE_LEVEL_SPACE
    # A word-end suffix (CLIP's </w>) marks words another way; and a mark no piece carries marks nothing.
    if mark and not model.get("end_of_word_suffix") and any(t.startswith(mark) for t in tok.get_vocab()):
        return WORD_START, mark
    what = f"a {model.get('type')} model" + (
        f" with end_of_word_suffix {model['end_of_word_suffix']!r}" if model.get("end_of_word_suffix") else ""
    )
    raise WordConventionError(
        f"objective.whole_word_mask cannot tell where words start with this tokenizer ({what}, pre-tokenizer "
        f"{[p.get('type') for p in _components(spec.get('pre_tokenizer'))] or None}): it knows WordPiece '##', "
        "Metaspace '▁' and byte-level 'Ġ'; prepare with one of those (train:V, train-unigram:V, train-bpe:V) or set "
        "objective.whole_word_mask=false"
    )


def continuation_ids(tok: Tokenizer, special: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """Ids of the pieces that continue a word, for whole-word masking (see the module's docstring). Special
    tokens (``special`` and the tokenizer's added special tokens) never continue a word."""
    kind, mark = word_convention(tok)
    added = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    skip = set(special) | added
    vocab = tok.get_vocab(with_added_tokens=True).items()
    if kind == WORDPIECE:
        return sorted(i for token, i in vocab if token.startswith(mark) and i not in skip)
    return sorted(i for token, i in vocab if not token.startswith(mark) and i not in skip)


# Scripts written without spaces between words: a run of them is one "word" to a word-start mark.
_UNSEGMENTED = ("CJK UNIFIED IDEOGRAPH", "HIRAGANA", "KATAKANA", "THAI", "LAO", "KHMER", "MYANMAR", "TIBETAN")


def _unsegmented(ch: str, ideographs_split: bool) -> bool:
    name = unicodedata.name(ch, "")
    if ideographs_split and name.startswith("CJK UNIFIED IDEOGRAPH"):
        return False
    return name.startswith(_UNSEGMENTED)


def unsegmented_share(tok: Tokenizer) -> float:
    """The share of the vocabulary's pieces written in a script without spaces between words, counting an
    ideograph only where the tokenizer does not already make each one a word (BERT's normaliser)."""
    spec = json.loads(tok.to_str())
    split = any(
        n.get("type") == "BertNormalizer" and n.get("handle_chinese_chars", True)
        for n in _components(spec.get("normalizer"))
    )
    ids = range(tok.get_vocab_size(with_added_tokens=False))
    pieces = tok.decode_batch([[i] for i in ids], skip_special_tokens=True)
    hits = sum(1 for p in pieces if any(_unsegmented(ch, split) for ch in p))
    return hits / max(1, len(pieces))


def warn_if_unsegmented(tok: Tokenizer, threshold: float = 0.05) -> bool:
    """One warning line when whole-word masking would see runs of Chinese/Japanese/Thai text as single words
    (a cheap look at the vocabulary, not the corpus). Returns whether it warned."""
    share = unsegmented_share(tok)
    if share < threshold:
        return False
    log.warning(
        "objective.whole_word_mask: %.0f%% of the vocabulary is in scripts written without spaces (Chinese, "
        "Japanese, Thai...), where this tokenizer marks no words: a run of such text counts as one word, and a run "
        "longer than the masking budget is never masked; pre-segment the text with spaces (Chinese-ELECTRA uses "
        "LTP), or use a WordPiece vocabulary (train:V), which makes each CJK ideograph a word (docs/languages.md)",
        100 * share,
    )
    return True
