"""The tokenizer: load a BERT ``vocab.txt``, a ``tokenizer.json`` or a model directory (one with only a
SentencePiece model is converted), or train a WordPiece, Unigram or byte-level BPE vocabulary on the corpus.

Everything is HF ``tokenizers`` (Rust, fast batched encoding). A vocab.txt is turned into the same pipeline
BERT uses (BertNormalizer -> BertPreTokenizer -> WordPiece), so a vocab from the BERT/ELECTRA release
tokenizes exactly as the reference's ``FullTokenizer`` does. Where words start, for whole-word masking, is
data/words.py's concern.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from electra_scale.infra import storage

# ELECTRA/BERT special tokens. A trained vocab puts them first, so they get ids 0..4 in this order.
SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}

SPEC_FORMS = (
    "a path (local or s3://) to a BERT vocab.txt, a path to a tokenizer.json, a Hugging Face model directory "
    "holding either or a SentencePiece model (a released ELECTRA, DeBERTa-v3, XLM-R, or our export's "
    "discriminator/), or train:VOCAB_SIZE (WordPiece), train-unigram:VOCAB_SIZE or train-bpe:VOCAB_SIZE"
)
# The trained vocabularies: spec prefix -> model. train:V stays WordPiece, as BERT's and ELECTRA's.
TRAINED = {"train": "wordpiece", "train-wordpiece": "wordpiece", "train-unigram": "unigram", "train-bpe": "bpe"}
# Unicode normalisation choices (prepare --normalization). "bert" is BertNormalizer's (NFD, and accents stripped
# when lowercasing: it turns Russian "й" into "и"); the others keep accents. None: the model's default.
NORMALIZATIONS = ("bert", "nfkc", "nfc", "none")
DEFAULT_NORMALIZATION = {"wordpiece": "bert", "unigram": "nfkc", "bpe": "nfkc"}  # nfkc: SentencePiece's default
# The SentencePiece files that released model directories ship, in the order they are looked for.
SENTENCEPIECE_FILES = ("spm.model", "sentencepiece.bpe.model", "spiece.model", "sentencepiece.model", "tokenizer.model")
LANGUAGES_EXTRA = "pip install 'electra-scale[languages]' (the sentencepiece and protobuf packages)"


def _normalizer(model: str, lowercase: bool, normalization: str | None):
    choice = normalization or DEFAULT_NORMALIZATION[model]
    if choice not in NORMALIZATIONS:
        raise ValueError(f"normalization {choice!r} is not one of {', '.join(NORMALIZATIONS)}")
    if choice == "bert":
        return normalizers.BertNormalizer(lowercase=lowercase)
    steps = {"nfkc": [normalizers.NFKC()], "nfc": [normalizers.NFC()], "none": []}[choice]
    if model == "wordpiece":  # BERT's text cleaning and a space around each CJK ideograph (a word each), no NFD
        steps.append(normalizers.BertNormalizer(lowercase=lowercase, strip_accents=False))
    elif lowercase:
        steps.append(normalizers.Lowercase())
    return normalizers.Sequence(steps)


def _bert_pipeline(model: models.Model, lowercase: bool, normalization: str | None = None) -> Tokenizer:
    tok = Tokenizer(model)
    tok.normalizer = _normalizer("wordpiece", lowercase, normalization)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def add_bert_post_processor(tok: Tokenizer, ids: dict[str, int] | None = None) -> None:
    """`[CLS] A [SEP] (B [SEP])` for fine-tuning/export users of tokenizer.json, with the vocabulary's own names
    for them (``ids``: by role, default ``special_ids``). prepare() never uses it: it encodes with
    add_special_tokens=False and builds examples itself."""
    ids = ids or special_ids(tok)
    cls, sep = tok.id_to_token(ids["cls"]), tok.id_to_token(ids["sep"])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, ids["cls"]), (sep, ids["sep"])],
    )


def train_tokenizer(model: str, vocab_size: int, texts: Iterator[str], lowercase: bool, normalization: str | None):
    """A new vocabulary of ``model`` (wordpiece, unigram or bpe) with ELECTRA's special tokens at ids 0..4.
    Unigram is SentencePiece's model with its Metaspace ``▁`` word marks (ALBERT, XLNet, T5); bpe is
    byte-level BPE (GPT-2, RoBERTa): every byte has a piece, so no text is [UNK]."""
    special = list(SPECIAL_TOKENS.values())
    if model == "wordpiece":
        tok = _bert_pipeline(models.WordPiece(unk_token="[UNK]"), lowercase, normalization)
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False)
    elif model == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=special, unk_token="[UNK]", show_progress=False
        )
    else:
        tok = Tokenizer(models.BPE())
        # add_prefix_space: every word, the first of a sentence too, carries the Ġ word mark.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    if model != "wordpiece":
        tok.normalizer = _normalizer(model, lowercase, normalization)
    tok.train_from_iterator(texts, trainer=trainer)
    add_bert_post_processor(tok)
    return tok


def load_tokenizer(
    spec: str,
    texts: Callable[[], Iterator[str]] | None = None,
    lowercase: bool = True,
    normalization: str | None = None,
) -> Tokenizer:
    """Build the tokenizer that ``spec`` names (see SPEC_FORMS). ``texts`` is only used by ``train*:N``;
    ``lowercase`` and ``normalization`` (one of NORMALIZATIONS; None for the model's default) only by vocab.txt and
    train*:N (a tokenizer.json carries its own normalizer).

    train*:N is not bit-reproducible across runs: HF's trainers break frequency ties in hash-map order. For
    byte-identical re-runs, pass the tokenizer.json saved beside the first run's shards."""
    spec, lowercase = resolve_spec(spec, lowercase)
    kind, _, size = spec.partition(":")
    if is_trained_spec(spec):
        if kind not in TRAINED:
            raise ValueError(
                f"tokenizer spec {spec!r}: the trained vocabularies are {', '.join(f'{k}:N' for k in TRAINED)}"
            )
        try:
            vocab_size = int(size)
        except ValueError:
            vocab_size = 0
        if vocab_size <= len(SPECIAL_TOKENS):
            raise ValueError(f"tokenizer spec {spec!r}: {kind}:N needs an integer vocab size N > 5, e.g. {kind}:30522")
        if texts is None:
            raise ValueError(f"tokenizer spec {spec!r} trains a vocab but no texts were given to train it on")
        return train_tokenizer(TRAINED[kind], vocab_size, texts(), lowercase, normalization)
    if spec.endswith((".json", ".model")):
        if normalization is not None:
            raise ValueError(
                f"--normalization {normalization} applies to a trained vocabulary (train*:N) or a vocab.txt; "
                f"{spec} carries its own normalizer: leave --normalization out"
            )
        if spec.endswith(".model"):
            return sentencepiece_tokenizer(spec)
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
        tok = _bert_pipeline(models.WordPiece(vocab=vocab, unk_token="[UNK]"), lowercase, normalization)
        add_bert_post_processor(tok)
        return tok
    raise ValueError(f"unknown tokenizer spec {spec!r}; use {SPEC_FORMS}")


def is_trained_spec(spec: str) -> bool:
    """Whether a tokenizer spec learns its vocabulary from the corpus (train:V, train-unigram:V, train-bpe:V)."""
    return re.match(r"train[a-z-]*:", spec) is not None and not _is_file(spec)


def _is_file(spec: str) -> bool:
    return spec.endswith((".json", ".txt", ".model"))


def _is_file_or_trained(spec: str) -> bool:
    return is_trained_spec(spec) or _is_file(spec)


def resolve_spec(spec: str, lowercase: bool) -> tuple[str, bool]:
    """A tokenizer spec as ``load_tokenizer`` reads it, and whether it lowercases: a model directory becomes its
    tokenizer file (``model_dir_tokenizer``); a file or train*:N is as given."""
    spec = str(spec)
    if _is_file_or_trained(spec):
        return spec, lowercase
    return model_dir_tokenizer(spec, lowercase)


def model_dir_tokenizer(directory: str, lowercase: bool) -> tuple[str, bool]:
    """The tokenizer file of a Hugging Face model directory: its vocab.txt, else tokenizer.json, else a
    SentencePiece model (converted when loaded), and whether it lowercases (``do_lower_case`` in
    tokenizer_config.json, where present), so that shards made for a released model tokenize as it was trained."""
    names = ("vocab.txt", "tokenizer.json", *SENTENCEPIECE_FILES)
    found = next((url for url in (storage.join(directory, n) for n in names) if storage.exists(url)), None)
    tok_json = storage.join(directory, "tokenizer.json")
    # A vocab.txt is read as WordPiece: beside another model's tokenizer.json (our shards of a Unigram or BPE
    # vocabulary write both) it is only that tokenizer's token list.
    if (
        found
        and found.endswith("vocab.txt")
        and storage.exists(tok_json)
        and json.loads(storage.read_text(tok_json)).get("model", {}).get("type") != "WordPiece"
    ):
        found = tok_json
    if found is None:
        raise ValueError(
            f"tokenizer {directory!r}: no vocab.txt, tokenizer.json or SentencePiece model there; use {SPEC_FORMS}"
        )
    settings = storage.join(directory, "tokenizer_config.json")
    if storage.exists(settings):
        lowercase = bool(json.loads(storage.read_text(settings)).get("do_lower_case", lowercase))
    return found, lowercase


def sentencepiece_tokenizer(url: str) -> Tokenizer:
    """A SentencePiece model (``spm.model`` of DeBERTa-v3/mDeBERTa, ``sentencepiece.bpe.model`` of XLM-R...) as
    a ``tokenizers`` pipeline, by transformers' converter (convert_slow_tokenizer), with the ids the released
    model was trained with. Needs the ``languages`` extra (sentencepiece, protobuf)."""
    try:
        import google.protobuf  # noqa: F401
        import sentencepiece  # noqa: F401
    except ImportError as err:
        raise ValueError(
            f"{url} is a SentencePiece model; converting it needs the languages extra: {LANGUAGES_EXTRA}"
        ) from err
    import importlib
    import tempfile
    import types

    # The module, not transformers' function of the same name that ``from transformers import`` gives.
    convert = importlib.import_module("transformers.convert_slow_tokenizer")

    name = url.rstrip("/").rsplit("/", 1)[-1]
    # The converter of the model family that ships this file: XLM-R's adds fairseq's id offset and <mask>.
    converter = {
        "spm.model": convert.DebertaV2Converter,
        "sentencepiece.bpe.model": convert.XLMRobertaConverter,
    }.get(name, convert.SpmConverter)
    with tempfile.TemporaryDirectory() as tmp:
        local = f"{tmp}/{name}"
        storage.download_file(url, local)
        # The converter reads a few settings off the slow tokenizer, which transformers 5 no longer builds from
        # the file: the released models' defaults (no lowercasing, no punctuation split, a prefix space).
        original = types.SimpleNamespace(
            vocab_file=local,
            do_lower_case=False,
            split_by_punct=False,
            add_prefix_space=True,
            legacy=True,
            convert_tokens_to_ids=lambda token: 0,  # only for the post-processor, dropped below
        )
        try:
            tok = converter(original).converted()
        except Exception as err:  # protobuf raises DecodeError on a file that is not a SentencePiece model
            raise ValueError(f"{url} is not a SentencePiece model transformers can convert: {err}") from err
    tok.post_processor = None  # prepare adds no special tokens itself; the export writes the template
    return tok


def special_roles(spec: str) -> dict[str, str]:
    """A model directory's own names for the special tokens (``tokenizer_config.json``, then
    ``special_tokens_map.json``): XLM-R's <s> </s> <pad> <unk> <mask> play [CLS] [SEP] [PAD] [UNK] [MASK]. Empty
    for anything but a directory, or one that names none."""
    spec = str(spec)
    if _is_file_or_trained(spec):
        return {}
    roles: dict[str, str] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the second wins where both name one
        url = storage.join(spec, name)
        if not storage.exists(url):
            continue
        settings = json.loads(storage.read_text(url))
        for role in SPECIAL_TOKENS:
            value = settings.get(f"{role}_token")
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                roles[role] = value
    return roles


def special_ids(tok: Tokenizer, roles: dict[str, str] | None = None) -> dict[str, int]:
    """{"pad", "unk", "cls", "sep", "mask"} -> id; every one of them must be in the vocab. ``roles``: a model
    directory's own names for them (``special_roles``), used where the vocab lacks ELECTRA's name."""
    roles = roles or {}
    ids = {}
    for name, token in SPECIAL_TOKENS.items():
        found = tok.token_to_id(token)
        ids[name] = found if found is not None or name not in roles else tok.token_to_id(roles[name])
    missing = [SPECIAL_TOKENS[name] for name, i in ids.items() if i is None]
    if missing:
        raise ValueError(
            f"the tokenizer's vocab lacks the special token(s) {' '.join(missing)} that ELECTRA needs, and names no "
            "token for that role (special_tokens_map.json); use a vocab with [PAD] [UNK] [CLS] [SEP] [MASK], a model "
            "directory whose special_tokens_map.json names them, or train:N"
        )
    return ids  # type: ignore[return-value]


def normalization_of(tok: Tokenizer) -> str:
    """The tokenizer's Unicode normalisation and casing in a few words, for the manifest: its normalizer's
    steps, e.g. "NFKC+Lowercase" or "BertNormalizer(lowercase,strip_accents)"."""

    def describe(node) -> list[str]:
        if not isinstance(node, dict):
            return []
        if node.get("type") == "Sequence":
            return [d for sub in node.get("normalizers", []) for d in describe(sub)]
        if node.get("type") == "BertNormalizer":
            lower, strip = node.get("lowercase"), node.get("strip_accents")
            flags = ["lowercase"] * bool(lower) + ["strip_accents"] * bool(strip if strip is not None else lower)
            return [f"BertNormalizer({','.join(flags)})"]
        return [str(node.get("type"))]

    return "+".join(describe(json.loads(tok.to_str()).get("normalizer"))) or "none"


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
