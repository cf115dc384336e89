"""The WordPiece tokenizer: load a BERT ``vocab.txt`` or a ``tokenizer.json``, or train one on the corpus.

Everything is HF ``tokenizers`` (Rust, fast batched encoding). A vocab.txt is turned into the same pipeline
BERT uses (BertNormalizer -> BertPreTokenizer -> WordPiece), so a vocab from the BERT/ELECTRA release
tokenizes exactly as the reference's ``FullTokenizer`` does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from electra_scale.infra import storage

# ELECTRA/BERT special tokens. A trained vocab puts them first, so they get ids 0..4 in this order.
SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}

SPEC_FORMS = (
    "a path (local or s3://) to a BERT vocab.txt, a path to a tokenizer.json, a Hugging Face model directory "
    "holding either (a released ELECTRA, or our export's discriminator/), or train:VOCAB_SIZE"
)


def _bert_pipeline(model: models.Model, lowercase: bool) -> Tokenizer:
    tok = Tokenizer(model)
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _add_bert_post_processor(tok: Tokenizer) -> None:
    """`[CLS] A [SEP] (B [SEP])` for fine-tuning/export users of tokenizer.json. prepare() never uses it: it
    encodes with add_special_tokens=False and builds examples itself."""
    ids = special_ids(tok)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["cls"]), ("[SEP]", ids["sep"])],
    )


def load_tokenizer(spec: str, texts: Callable[[], Iterator[str]] | None = None, lowercase: bool = True) -> Tokenizer:
    """Build the tokenizer that ``spec`` names (see SPEC_FORMS). ``texts`` is only used by ``train:N`` and
    ``lowercase`` only by vocab.txt and train:N (a tokenizer.json carries its own normalizer).

    train:N is not bit-reproducible across runs: HF's WordPiece trainer breaks frequency ties in hash-map
    order. For byte-identical re-runs, pass the tokenizer.json saved beside the first run's shards."""
    spec, lowercase = resolve_spec(spec, lowercase)
    if spec.startswith("train:"):
        try:
            vocab_size = int(spec.split(":", 1)[1])
        except ValueError:
            vocab_size = 0
        if vocab_size <= len(SPECIAL_TOKENS):
            raise ValueError(f"tokenizer spec {spec!r}: train:N needs an integer vocab size N > 5, e.g. train:30522")
        if texts is None:
            raise ValueError(f"tokenizer spec {spec!r} trains a vocab but no texts were given to train it on")
        tok = _bert_pipeline(models.WordPiece(unk_token="[UNK]"), lowercase)
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()), show_progress=False
        )
        tok.train_from_iterator(texts(), trainer=trainer)
        _add_bert_post_processor(tok)
        return tok
    if spec.endswith(".json"):
        try:
            return Tokenizer.from_str(storage.read_text(spec))
        except Exception as err:  # tokenizers raises a bare Exception on a malformed file
            if isinstance(err, storage.StorageError):
                raise
            raise ValueError(f"{spec} is not a valid tokenizer.json: {err}") from err
    if spec.endswith(".txt"):
        # One token per line; the line number is the id (BERT's vocab.txt convention).
        tokens = storage.read_text(spec).splitlines()
        vocab: dict[str, int] = {}
        for i, token in enumerate(tokens):
            vocab.setdefault(token.rstrip("\r"), i)
        if "[UNK]" not in vocab:
            raise ValueError(f"vocab {spec} has no [UNK] token; is it a BERT-style WordPiece vocab.txt?")
        tok = _bert_pipeline(models.WordPiece(vocab=vocab, unk_token="[UNK]"), lowercase)
        _add_bert_post_processor(tok)
        return tok
    raise ValueError(f"unknown tokenizer spec {spec!r}; use {SPEC_FORMS}")


def resolve_spec(spec: str, lowercase: bool) -> tuple[str, bool]:
    """A tokenizer spec as ``load_tokenizer`` reads it, and whether it lowercases: a model directory becomes its
    tokenizer file (``model_dir_tokenizer``); a file or train:N is as given."""
    spec = str(spec)
    if spec.startswith("train:") or spec.endswith((".json", ".txt")):
        return spec, lowercase
    return model_dir_tokenizer(spec, lowercase)


def model_dir_tokenizer(directory: str, lowercase: bool) -> tuple[str, bool]:
    """The tokenizer file of a Hugging Face model directory: its vocab.txt (else tokenizer.json), and whether it
    lowercases (``do_lower_case`` in tokenizer_config.json, where present), so that shards made for a released
    model tokenize as it was trained."""
    vocab, tok_json = storage.join(directory, "vocab.txt"), storage.join(directory, "tokenizer.json")
    found = vocab if storage.exists(vocab) else tok_json if storage.exists(tok_json) else None
    if found is None:
        raise ValueError(f"tokenizer {directory!r}: no vocab.txt or tokenizer.json there; use {SPEC_FORMS}")
    settings = storage.join(directory, "tokenizer_config.json")
    if storage.exists(settings):
        lowercase = bool(json.loads(storage.read_text(settings)).get("do_lower_case", lowercase))
    return found, lowercase


def continuation_ids(tok: Tokenizer) -> list[int]:
    """Ids of the WordPiece continuation pieces (``##...``), for whole-word masking."""
    return sorted(i for token, i in tok.get_vocab().items() if token.startswith("##"))


def special_ids(tok: Tokenizer) -> dict[str, int]:
    """{"pad", "unk", "cls", "sep", "mask"} -> id; every one of them must be in the vocab."""
    ids = {name: tok.token_to_id(token) for name, token in SPECIAL_TOKENS.items()}
    missing = [SPECIAL_TOKENS[name] for name, i in ids.items() if i is None]
    if missing:
        raise ValueError(
            f"the tokenizer's vocab lacks the special token(s) {' '.join(missing)} that ELECTRA needs; "
            "use a BERT-style vocab (with [PAD] [UNK] [CLS] [SEP] [MASK]) or train:N"
        )
    return ids  # type: ignore[return-value]


def tokenizer_json(tok: Tokenizer) -> str:
    """The exact text saved as tokenizer.json (and hashed into the manifest)."""
    return tok.to_str()


def tokenizer_sha256(tok: Tokenizer) -> str:
    return hashlib.sha256(tokenizer_json(tok).encode("utf-8")).hexdigest()


def save_tokenizer(tok: Tokenizer, dir_url: str) -> None:
    """Write ``tokenizer.json`` and ``vocab.txt`` (one token per line, in id order) under ``dir_url``."""
    storage.write_text(storage.join(dir_url, "tokenizer.json"), tokenizer_json(tok))
    by_id = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise ValueError("the tokenizer's ids are not contiguous 0..N-1; it cannot be written as a vocab.txt")
    storage.write_text(storage.join(dir_url, "vocab.txt"), "".join(f"{t}\n" for t, _ in by_id))
