"""Continue pretraining from a released checkpoint: ``model.init_from`` (and ``model.init_generator_from``).

A Hugging Face ELECTRA directory (``config.json`` + weights + tokenizer files: a model a user downloaded, or one
of our own exports) starts the run instead of a random init. Three things are checked before anything trains:

- the shape: taken from the directory's ``config.json`` (``adopt_shape``, at config load); a model key that the
  run config sets to another value is an error naming it;
- the vocabulary: the directory's tokens must be the shards' tokens, id for id (``check_vocabulary``); else the
  shards must be re-made with its tokenizer, and the error gives the ``prepare`` command;
- the weights: loaded strictly (``load_weights``), with the embeddings shared as in pretraining.

google-research/electra continues from a checkpoint through its ``init_checkpoint`` flag the same way: all weights
restored, optimizer state and schedule fresh.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import torch

from electra_scale.config import ConfigError
from electra_scale.data.tokenizer import load_tokenizer, model_dir_tokenizer
from electra_scale.engine.model import DISCRIMINATOR_SHAPE, GENERATOR_SHAPE
from electra_scale.infra import storage

log = logging.getLogger("electra_scale")

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def read_hf_config(directory: str) -> dict:
    url = storage.join(directory, "config.json")
    if not storage.exists(url):
        raise ConfigError(
            f"model.init_from={directory}: no config.json there; it must be a Hugging Face ELECTRA directory "
            "(config.json, model.safetensors, vocab.txt), e.g. an `electra-scale export` output's discriminator/"
        )
    hf = json.loads(storage.read_text(url))
    if hf.get("model_type") != "electra":
        raise ConfigError(f"{url}: model_type is {hf.get('model_type')!r}, not 'electra'")
    return hf


def adopt_shape(raw: dict) -> None:
    """Fill the raw config's model section from ``init_from``'s config.json (and ``init_generator_from``'s).
    A key the run config sets to another value is refused, so nobody trains a shape they did not mean."""
    model = raw.setdefault("model", {})
    wanted: dict[str, tuple[object, str]] = {}
    disc = read_hf_config(model["init_from"])
    for ours, theirs in DISCRIMINATOR_SHAPE.items():
        wanted[ours] = (disc[theirs], model["init_from"])
    if model.get("init_generator_from"):
        gen = read_hf_config(model["init_generator_from"])
        if gen["num_hidden_layers"] != disc["num_hidden_layers"] or gen["vocab_size"] != disc["vocab_size"]:
            raise ConfigError(
                f"model.init_generator_from={model['init_generator_from']}: {gen['num_hidden_layers']} layers and "
                f"vocabulary {gen['vocab_size']}, but the discriminator has {disc['num_hidden_layers']} and "
                f"{disc['vocab_size']}; the generator must have the discriminator's depth and vocabulary"
            )
        for ours, theirs in GENERATOR_SHAPE.items():
            wanted[ours] = (gen[theirs], model["init_generator_from"])
    for key, (value, source) in wanted.items():
        if key in model and model[key] is not None and model[key] != value:
            raise ConfigError(
                f"model.{key}={model[key]!r} in the run config, but {source}/config.json has {value!r}; the shape "
                f"comes from the model being continued: drop model.{key} from the config (or set it to {value!r})"
            )
        model[key] = value


def _vocabulary(url_dir: str) -> list[str] | None:
    """The tokens of a directory's tokenizer (tokenizer.json, vocab.txt or a SentencePiece model, converted), in id
    order; None if it has none. tokenizer.json first: a vocab.txt beside it is only its token list, which a
    vocabulary without BERT's [UNK] (XLM-R's <unk>) cannot be read back from."""
    tok_json = storage.join(url_dir, "tokenizer.json")
    try:
        spec = tok_json if storage.exists(tok_json) else model_dir_tokenizer(url_dir, lowercase=True)[0]
    except ValueError:
        return None
    return [t for t, _ in sorted(load_tokenizer(spec).get_vocab().items(), key=lambda kv: kv[1])]


def check_vocabulary(init_from: str, shards: str) -> None:
    """The shards must be tokenized with the continued model's own vocabulary, id for id: the same size is not
    enough (a token's row of the embedding table must mean the same token)."""
    theirs, ours = _vocabulary(init_from), _vocabulary(shards)
    fix = (
        f"re-make the shards with its tokenizer: electra-scale prepare --tokenizer {init_from.rstrip('/')} ... "
        "(a directory, or its vocab.txt)"
    )
    if theirs is None:
        raise ConfigError(
            f"model.init_from={init_from} has no vocab.txt, tokenizer.json or SentencePiece model to check the shards "
            "against"
        )
    if ours is None:
        raise ConfigError(f"the shards at {shards} have no vocab.txt or tokenizer.json; {fix}")
    if theirs != ours:
        first = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
        raise ConfigError(
            f"the shards at {shards} were tokenized with another vocabulary than model.init_from ({len(ours)} "
            f"against {len(theirs)} tokens, first difference at id {first}); {fix}"
        )


def weights_url(directory: str) -> str:
    """The URL of a HF directory's weights file (safetensors, else a torch .bin)."""
    for name in WEIGHT_FILES:
        url = storage.join(directory, name)
        if storage.exists(url):
            return url
    raise ConfigError(f"{directory}: no {' or '.join(WEIGHT_FILES)} with the weights")


def fetch_weights(directories: list[str], scratch: Path, local_rank: int, group) -> dict[str, str]:
    """Where each rank reads each directory's weights: a local file as it is; an S3 object once per node, from
    the node-local ``scratch`` that local rank 0 downloads it into while the node's other ranks wait (as
    resuming does with a checkpoint). Every rank must call it (collective on ``group``, a gloo group). A failed
    download stops every rank with the same one line."""
    import torch.distributed as dist

    from electra_scale.engine.checkpoint import resume_budget

    urls = {d: weights_url(d) for d in dict.fromkeys(directories)}
    remote = {d: url for d, url in urls.items() if storage.is_s3(url)}
    if not remote:
        return urls
    local = {d: str(scratch / f"{i}-{url.rsplit('/', 1)[1]}") for i, (d, url) in enumerate(remote.items())}
    # The node's other ranks wait as long as a checkpoint of this size may take to resume: generous for a large
    # model on a slow store, and longer than a collective's default timeout.
    size = [sum(storage.object_size(url) for url in remote.values()) if dist.get_rank() == 0 else 0]
    dist.broadcast_object_list(size, src=0, group=group)
    problem = None
    if local_rank == 0:
        try:
            for d, url in remote.items():
                storage.download_file(url, local[d])
        except storage.StorageError as err:
            problem = str(err)
    dist.monitored_barrier(group=group, timeout=resume_budget(size[0]))
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem, group=group)
    found = next((p for p in problems if p), None)
    if found:
        raise storage.StorageError(f"model.init_from: {found}")
    return {**urls, **local}


def _state_dict(path: str) -> dict[str, torch.Tensor]:
    """The weights in a safetensors or torch .bin file (local, or read whole from S3)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(path)
        if storage.is_s3(path):
            local = Path(tmp, path.rsplit("/", 1)[1])
            local.write_bytes(storage.read_bytes(path))
        if local.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(str(local))
        return torch.load(local, map_location="cpu", weights_only=True)


def _load(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str, skip: tuple[str, ...] = ()) -> None:
    """Strict load of a HF state dict into our module of the same class; ``skip``: prefixes kept as they are."""
    state = {k: v for k, v in state.items() if not k.startswith(skip)}
    own = {k for k in module.state_dict() if not k.startswith(skip)}
    missing = sorted(own - set(state) - {k for k in own if k.endswith("position_ids")})
    # A tied output layer may be saved or not; ours is tied, so a saved copy is the same tensor.
    unexpected = sorted(set(state) - own)
    if missing or unexpected:
        raise ConfigError(
            f"{source}: its weights do not fit an ELECTRA of its own config.json (missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}); is it an ElectraForPreTraining / ElectraForMaskedLM checkpoint?"
        )
    with torch.no_grad():
        for name, tensor in module.state_dict(keep_vars=True).items():
            if name in state:
                tensor.copy_(state[name].to(tensor.dtype))


def load_weights(
    objective: torch.nn.Module, init_from: str, init_generator_from: str | None, files: dict[str, str] | None = None
) -> None:
    """Start ``objective`` (an ElectraObjective) from released weights. The discriminator's embeddings are the
    shared table (as in pretraining); a generator's own embeddings, when they differ from it, are not used: the
    discriminator is the model being continued, and one table must serve both (logged). ``files`` maps a
    directory to the copy of its weights to read (``fetch_weights``); else they are read from the directory."""
    files = files or {}
    discriminator, generator = objective.discriminator, objective.generator
    # With objective.embedding_sharing=gdes the released table becomes E_G (shared, as always) and the
    # discriminator's E_delta stays at zero: the continued discriminator starts exactly as released.
    state = _state_dict(files.get(init_from) or weights_url(init_from))
    _load(discriminator, state, init_from)
    log.info("initialised the discriminator from %s", init_from)
    if not init_generator_from:
        log.info("no model.init_generator_from: the generator starts fresh (width %d)", generator.config.hidden_size)
        return
    gen_state = _state_dict(files.get(init_generator_from) or weights_url(init_generator_from))
    theirs = gen_state.get("electra.embeddings.word_embeddings.weight")
    if theirs is not None:
        ours = discriminator.electra.embeddings.word_embeddings.weight
        gap = float((theirs.float() - ours.detach().float().cpu()).abs().max())
        if gap > 0:
            log.info(
                "the generator at %s has embeddings of its own (max difference %.3g from the discriminator's); "
                "training shares one table, so the discriminator's are kept",
                init_generator_from,
                gap,
            )
    _load(generator, gen_state, init_generator_from, skip=("electra.embeddings.", "generator_lm_head.weight"))
    log.info("initialised the generator from %s", init_generator_from)
