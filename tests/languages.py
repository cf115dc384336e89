"""Real non-Latin text for the tokenizer conventions (tests/data/languages/, see its README), and an oracle for
where its words are that does not read the vocabulary's marks: BERT's pre-tokenizer's words for WordPiece, the
text's whitespace for the word-start conventions (Metaspace, byte-level). Used by tests/test_languages.py and
scripts/language_figures.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from electra_scale.config import ObjectiveConfig
from electra_scale.data.words import WORDPIECE, continuation_ids, word_convention
from electra_scale.engine.masking import draw, mask_tokens, max_predictions

DATA = Path(__file__).parent / "data" / "languages"
RUSSIAN = DATA / "ru_manpages.txt"
CHINESE = DATA / "zh_manpages.txt"
# The three trained vocabularies, one per convention: WordPiece ##, Unigram ▁ (Metaspace), byte-level BPE Ġ.
MODELS = {"wordpiece": "train:1500", "unigram": "train-unigram:1500", "bpe": "train-bpe:1500"}


def lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def oracle_words(tok, text: str) -> tuple[list[int], list[int]]:
    """The text's ids (no special tokens) and, per id, the index of the word it belongs to."""
    enc = tok.encode(text, add_special_tokens=False)
    if word_convention(tok)[0] == WORDPIECE:
        return enc.ids, list(enc.word_ids)
    # Words are what the pre-tokenizers make them: runs of non-space characters, each with the space before it;
    # a second space in a row is a word of its own (Metaspace writes it as a bare ▁, byte-level as a bare Ġ).
    word_of_char: list[int | None] = [None] * len(text)
    w = -1
    for i, ch in enumerate(text):
        if ch.isspace():
            if i + 1 < len(text) and not text[i + 1].isspace():
                continue  # the separator: the next word's
            w += 1
            word_of_char[i] = w
        else:
            w += i == 0 or text[i - 1].isspace()
            word_of_char[i] = w
    words = []
    for start, _ in enc.offsets:  # a piece that covers the separating space belongs to the word after it
        at = next((word_of_char[i] for i in range(start, len(text)) if word_of_char[i] is not None), w)
        words.append(at)
    return enc.ids, words


@dataclass
class Batch:
    ids: torch.Tensor  # [B, L]
    attn: torch.Tensor  # [B, L]
    words: torch.Tensor  # [B, L] a unique word number per example, -1 at [CLS]/[SEP]/padding


def batch(tok, texts: list[str], special: dict[str, int], seq_len: int = 128) -> Batch:
    """Whole lines packed into ``[CLS] line line ... [SEP]`` rows (no word is cut by a row's end)."""
    rows, row_words, cur, cur_words, n_words = [], [], [], [], 0
    for text in texts:
        ids, words = oracle_words(tok, text)
        if not ids or len(ids) > seq_len - 2:
            continue
        if len(cur) + len(ids) > seq_len - 2:
            rows.append(cur)
            row_words.append(cur_words)
            cur, cur_words = [], []
        base = n_words - min(words)
        cur += ids
        cur_words += [base + w for w in words]
        n_words = base + max(words) + 1
    if cur:
        rows.append(cur)
        row_words.append(cur_words)
    B = len(rows)
    ids = torch.full((B, seq_len), special["pad"], dtype=torch.long)
    attn = torch.zeros((B, seq_len), dtype=torch.long)
    words = torch.full((B, seq_len), -1, dtype=torch.long)
    for b, (row, ws) in enumerate(zip(rows, row_words)):
        full = [special["cls"], *row, special["sep"]]
        ids[b, : len(full)] = torch.tensor(full)
        attn[b, : len(full)] = 1
        words[b, 1 : 1 + len(ws)] = torch.tensor(ws)
    return Batch(ids, attn, words)


def continuation_table(tok, special: dict[str, int]) -> torch.Tensor:
    table = torch.zeros(tok.get_vocab_size(with_added_tokens=True), dtype=torch.bool)
    table[torch.tensor(continuation_ids(tok, set(special.values())), dtype=torch.long)] = True
    return table


def mask(tok, data: Batch, special: dict[str, int], whole_words: bool, seed: int = 7):
    """The objective's masking of the batch (engine/masking.mask_tokens), at the default mask_prob 0.15."""
    cfg = ObjectiveConfig(whole_word_mask=whole_words)
    B, L = data.ids.shape
    draws = draw(seed, torch.arange(B), L, max_predictions(cfg.mask_prob, L))
    table = continuation_table(tok, special) if whole_words else None
    return mask_tokens(data.ids, data.attn, special, cfg, tok.get_vocab_size(), draws, table)


def word_figures(data: Batch, m) -> dict[str, float]:
    """Pieces per word; among the words with a masked piece, the share masked whole; the masked share of the
    tokens (real, [CLS]/[SEP] included, as the objective's budget counts them) and of the words."""
    B = data.ids.shape[0]
    masked = torch.zeros_like(data.attn, dtype=torch.bool)
    for b in range(B):
        used = int(m.weights[b].sum())
        masked[b, m.positions[b, :used]] = True
    whole = touched = n_words = 0
    for b in range(B):
        ws = data.words[b]
        for w in ws[ws >= 0].unique():
            at = ws == w
            n_words += 1
            k = int(masked[b][at].sum())
            touched += k > 0
            whole += k > 0 and k == int(at.sum())
    pieces = int((data.words >= 0).sum())
    return {
        "pieces_per_word": pieces / n_words,
        "words_masked_whole": whole / max(1, touched),
        "masked_token_share": float(masked.sum()) / float(data.attn.sum()),
        "masked_word_share": touched / n_words,
        "words": n_words,
    }
