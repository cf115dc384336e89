"""Whole-word masking on real non-Latin text, per tokenizer model (issue 30): pieces per word, and among the words
with a masked piece the share masked whole, with whole-word masking on and off; the masked share of the tokens
and of the words. The vocabularies are trained here on the text (train:V, train-unigram:V, train-bpe:V, cased);
the words are tests/languages.py's oracle (BERT's pre-tokenizer's for WordPiece, the text's spaces otherwise).

    PYTHONPATH=. .venv/bin/python scripts/language_figures.py [--vocab 1500]
"""

from __future__ import annotations

import argparse

from electra_scale.data.tokenizer import load_tokenizer, special_ids
from tests.languages import CHINESE, RUSSIAN, batch, lines, mask, word_figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=1500)
    args = ap.parse_args()
    models = {"WordPiece": "train", "Unigram": "train-unigram", "byte-level BPE": "train-bpe"}
    print("| text | model | pieces/word | words masked whole (on) | (off) | masked tokens (on) | masked words (on) |")
    print("|---|---|---|---|---|---|---|")
    for corpus, name in ((RUSSIAN, "Russian"), (CHINESE, "Chinese")):
        texts = lines(corpus)
        for model, kind in models.items():
            tok = load_tokenizer(f"{kind}:{args.vocab}", lambda texts=texts: iter(texts), lowercase=False)
            special = special_ids(tok)
            data = batch(tok, texts, special)
            on = word_figures(data, mask(tok, data, special, whole_words=True))
            off = word_figures(data, mask(tok, data, special, whole_words=False))
            print(
                f"| {name} ({on['words']} words) | {model} | {on['pieces_per_word']:.2f} | "
                f"{on['words_masked_whole']:.3f} | {off['words_masked_whole']:.3f} | "
                f"{on['masked_token_share']:.3f} | {on['masked_word_share']:.3f} |"
            )


if __name__ == "__main__":
    main()
