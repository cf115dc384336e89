"""Export a checkpoint to Hugging Face format: ``OUT/discriminator``, ``OUT/generator`` (safetensors), each with
the tokenizer, loadable with ``ElectraForPreTraining.from_pretrained`` / ``ElectraForMaskedLM.from_pretrained``.

The fp32 master weights are consolidated from any ZeRO stage with DeepSpeed's own
``get_fp32_state_dict_from_zero_checkpoint``; the checkpoint's ``config.yaml`` says how to rebuild the model.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import torch
import yaml

from electra_scale.config import Config, config_from_saved
from electra_scale.engine.checkpoint import LATEST, MARKER, CheckpointError, NoCheckpointError, fetch_and_verify
from electra_scale.engine.objective import build_objective
from electra_scale.infra import storage

log = logging.getLogger("electra_scale")


def locate(checkpoint: str) -> tuple[str, str]:
    """Accept a run's output dir, its checkpoints/ dir, or one step's dir; return (checkpoints root, tag)."""
    checkpoint = checkpoint.rstrip("/")
    if storage.exists(storage.join(checkpoint, MARKER)):
        root, _, tag = checkpoint.rpartition("/")
        return root, tag
    for root in (storage.join(checkpoint, "checkpoints"), checkpoint):
        latest = storage.join(root, LATEST)
        if storage.exists(latest):
            return root, storage.read_text(latest).strip()
    raise NoCheckpointError(
        f"no complete checkpoint at {checkpoint}: expected a run's output dir (with checkpoints/latest) "
        f"or a checkpoint dir containing {MARKER}"
    )


def load_checkpoint_model(checkpoint: str, workdir: Path) -> tuple[Config, torch.nn.Module, Path]:
    """Rebuild the objective module (generator + discriminator, or the MLM) with the checkpoint's weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root, tag = locate(checkpoint)
    local_root = Path(root) if not storage.is_s3(root) else workdir / "checkpoints"
    problem = fetch_and_verify(root, local_root, tag)
    if problem:
        raise CheckpointError(f"checkpoint {root}/{tag} fails verification: {problem}")
    ckpt_dir = local_root / tag
    cfg = config_from_saved(yaml.safe_load((ckpt_dir / "config.yaml").read_text()), str(ckpt_dir))
    special = json.loads((ckpt_dir / "data_manifest.json").read_text())["special_ids"]
    cfg.objective.whole_word_mask = False  # masking plays no part in the weights (nor needs the vocabulary here)
    model = build_objective(cfg, special)
    state = get_fp32_state_dict_from_zero_checkpoint(str(local_root), tag=tag)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Non-persistent buffers (position ids) are rebuilt by the constructor; anything else missing is a bug.
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {tag} does not match its config: missing {missing}, unexpected {unexpected}")
    return cfg, model.eval(), ckpt_dir


def exported_tokenizer(ckpt_dir: Path):
    """The tokenizer the export ships, for ``AutoTokenizer.from_pretrained``: BERT's ``ElectraTokenizer`` over the
    vocab.txt where the shards' tokenizer is BERT's pipeline (WordPiece with BertNormalizer), else the shards' own
    tokenizer.json (Unigram, byte-level BPE, another normalisation) as a fast tokenizer that encodes the same ids,
    with the special tokens by the roles the manifest gives them. None for a checkpoint without a tokenizer."""
    from tokenizers import Tokenizer
    from transformers import ElectraTokenizer, PreTrainedTokenizerFast

    from electra_scale.data.tokenizer import add_bert_post_processor

    manifest = json.loads((ckpt_dir / "data_manifest.json").read_text())
    lowercase = manifest.get("lowercase", True)
    vocab, tok_json = ckpt_dir / "tokenizer" / "vocab.txt", ckpt_dir / "tokenizer" / "tokenizer.json"
    spec = json.loads(tok_json.read_text()) if tok_json.exists() else None
    bert = spec is None or (
        spec["model"]["type"] == "WordPiece" and (spec.get("normalizer") or {}).get("type") == "BertNormalizer"
    )
    if bert:
        return ElectraTokenizer(vocab=str(vocab), do_lower_case=lowercase) if vocab.exists() else None
    tok = Tokenizer.from_str(tok_json.read_text())
    ids = manifest["special_ids"]
    add_bert_post_processor(tok, ids)
    names = {f"{role}_token": tok.id_to_token(i) for role, i in ids.items()}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **names)


def export(checkpoint: str, outdir: str) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg, model, ckpt_dir = load_checkpoint_model(checkpoint, Path(tmp))
        staging = Path(tmp, "export")
        if cfg.objective.kind == "mlm":
            parts = {"mlm": model.mlm}
        else:
            # With objective.embedding_sharing=gdes, the discriminator's table is folded: E_G + E_delta.
            parts = {"discriminator": model.exported_discriminator(), "generator": model.generator}
        tokenizer = exported_tokenizer(ckpt_dir)
        written = {}
        for name, module in parts.items():
            target = staging / name
            module.save_pretrained(target, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(target)
            for path in sorted(p for p in target.rglob("*") if p.is_file()):
                storage.upload_file(path, storage.join(outdir, name, path.relative_to(target).as_posix()))
            written[name] = storage.join(outdir, name)
        log.info("exported %s to %s", ckpt_dir.name, outdir)
        return written
