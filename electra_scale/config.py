"""The run configuration: typed dataclasses, loaded from YAML, validated at load time.

A run is described by one YAML file (``configs/*.yaml``) plus dotted ``key=value`` overrides on the command
line, e.g. ``train.max_steps=200 data.shards=s3://bucket/shards``. Every key is checked against the dataclasses
below: an unknown key, a wrong type or an out-of-range value is a ``ConfigError`` whose message names the
key, the bad value and what is allowed.

The run config owns everything that determines the maths of training (model shape, objective, batch sizes,
learning rate and schedule, precision). The DeepSpeed JSON it names (``train.deepspeed_config``) owns only how
the work is spread (ZeRO stage, offload, communication); ``deepspeed_config()`` fills the run's values into
it and rejects a JSON that contradicts them.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import json
import os
import socket
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from electra_scale.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ sections
@dataclass
class ModelConfig:
    """Shapes of the discriminator and the generator (paper, Table 6 and Appendix B)."""

    vocab_size: int = 30522
    embedding_size: int = 128
    hidden_size: int = 256
    num_layers: int = 12
    num_heads: int = 4
    intermediate_size: int = 1024
    max_position_embeddings: int = 512
    # The generator has the discriminator's depth; its width is a fraction of it (1/4 for Small and Large,
    # 1/3 for Base). Heads default to hidden/64 and the FFN to 4 x hidden, as in the reference.
    generator_hidden_size: int = 64
    generator_num_heads: int | None = None
    generator_intermediate_size: int | None = None
    dropout: float = 0.1
    attention_dropout: float = 0.1
    # transformers: every Linear and Embedding from N(0, 0.02) (transformers' default). reference:
    # google-research/electra's, truncated normals and glorot-uniform where it used them (model.reference_init).
    init: Literal["transformers", "reference"] = "transformers"
    # Continue pretraining (engine/pretrained.py): a Hugging Face ELECTRA discriminator directory (local or
    # s3://, e.g. a released model or our own export) whose weights start the run; its config.json sets the shape
    # above. init_generator_from: the same for the generator (else a fresh one at generator_hidden_size).
    # A checkpoint in run.output_dir wins over both: resuming never re-initialises.
    init_from: str | None = None
    init_generator_from: str | None = None

    @property
    def gen_heads(self) -> int:
        return self.generator_num_heads or max(1, self.generator_hidden_size // 64)

    @property
    def gen_intermediate(self) -> int:
        return self.generator_intermediate_size or 4 * self.generator_hidden_size


@dataclass
class ObjectiveConfig:
    # electra: replaced token detection (generator + discriminator); mlm: BERT's masked LM, same interface.
    kind: Literal["electra", "mlm"] = "electra"
    mask_prob: float = 0.15
    # Of the masked positions: this share becomes [MASK], the rest keep the original token. ELECTRA uses
    # 0.85 and no random replacement; the MLM baseline uses BERT's 0.8 [MASK] / 0.1 random / 0.1 keep.
    mask_token_prob: float = 0.85
    random_token_prob: float = 0.0
    disc_weight: float = 50.0
    temperature: float = 1.0
    # A generator curriculum (off in the paper's runs): the sampling temperature falls linearly from
    # temperature_start to temperature over the first temperature_warmup_steps steps, so that early
    # replacements are near-uniform (an easy task) while the generator is still weak. None: always temperature.
    temperature_start: float | None = None
    temperature_warmup_steps: int = 0
    # Whole-word masking: a word's pieces are masked together (data/words.py reads where words start: WordPiece
    # ##, Metaspace ▁, byte-level Ġ).
    whole_word_mask: bool = False
    # shared: the paper's one embedding table for generator and discriminator. gdes: DeBERTa-v3's
    # gradient-disentangled sharing, the discriminator's word embeddings = stop_gradient(E_G) + E_delta.
    embedding_sharing: Literal["shared", "gdes"] = "shared"


def source_name(prefix: str) -> str:
    """A source's default name: the last part of its prefix (``s3://bucket/contracts`` -> ``contracts``)."""
    return prefix.rstrip("/").rsplit("/", 1)[-1] or prefix


@dataclass
class SourceConfig:
    """One shard set of a mix (``data.sources``): where it is and its share of every global batch."""

    shards: str = ""  # local dir or s3://bucket/prefix written by `electra-scale prepare`
    weight: float = 1.0  # relative: the weights are divided by their sum
    name: str | None = None  # in metrics and the sample log; null = the last part of shards

    @property
    def label(self) -> str:
        return self.name or source_name(self.shards)


@dataclass
class DataConfig:
    shards: str = ""  # local dir or s3://bucket/prefix written by `electra-scale prepare`
    # Or several shard sets, mixed in every global batch by weight (docs/data.md), instead of shards:
    # [{shards: s3://bucket/general, weight: 0.3}, {shards: s3://bucket/contracts, weight: 0.7}]. They must share
    # the tokenizer and seq_len; each runs through its own epochs.
    sources: list[SourceConfig] = field(default_factory=list)
    seq_len: int = 128
    # Dataloader worker processes per rank (per source, with data.sources), and windows each one reads ahead of
    # the step that needs them.
    num_workers: int = 2
    prefetch: int = 2
    # The stream is cut into this many partitions when a run starts (saved in its checkpoints); a rank of W
    # reads only its P/W of them, so W must divide P, also when resuming on another world size. null = the
    # largest W * 2^k up to 64 (at least W). Plan elastic resizes by choosing P: 512 runs on 1, 2, 4 ... 512
    # ranks (docs/data.md).
    partitions: int | None = None
    # Examples are shuffled within windows of this many consecutive blocks of a partition (~1 MiB each).
    shuffle_blocks: int = 1
    # A truncated or corrupt block: "error" stops the run naming the shard and the byte where it broke; "skip"
    # leaves it out and fills its slots with other examples of the same partition, so every rank keeps its
    # share of every step; each rank logs the blocks it left out (docs/faults.md).
    on_corrupt_shard: Literal["error", "skip"] = "error"

    def resolved_sources(self) -> list[SourceConfig]:
        """The run's sources: data.sources, or data.shards as the only one (weight 1)."""
        return self.sources or [SourceConfig(shards=self.shards)]

    @property
    def tokenizer_prefix(self) -> str:
        """Where the run's tokenizer is: every source has the same one, so the first's."""
        return self.resolved_sources()[0].shards


@dataclass
class OptimConfig:
    lr: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-6
    weight_decay: float = 0.01  # not applied to biases and LayerNorm weights, as in the reference
    # The reference's AdamWeightDecay has no bias correction. false = faithful (needs DeepSpeed's own Adam:
    # FusedAdam on GPU, a compiled op on CPU); true = standard AdamW (torch's, no compilation).
    bias_correction: bool = False
    # auto: torch AdamW when bias_correction is true and DeepSpeed's Adam otherwise.
    impl: Literal["auto", "torch", "deepspeed"] = "auto"
    warmup_steps: int = 10000
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    max_steps: int = 1_000_000
    global_batch_size: int = 128
    micro_batch_size: int = 32
    seed: int = 12345
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    deepspeed_config: str = "ds_configs/zero2.json"
    log_every: int = 10
    # Stop (with a checkpoint) once this step is reached, without changing the LR schedule, which still
    # runs to max_steps: for time-sliced clusters and for the demo's stop-and-resume.
    stop_at_step: int | None = None
    # Peak accelerator throughput for the MFU estimate; null = look up the GPU, none on CPU.
    peak_tflops: float | None = None
    # Padding-free micro-batches (engine/packing.py): the encoders compute only real tokens, one flat row per
    # micro-batch with attention kept inside each example. Same losses as the padded path, up to rounding.
    unpad: bool = False
    # Recompute each encoder layer's activations in the backward pass instead of keeping them: less memory
    # (a larger micro-batch fits), about a third more compute. Off: the presets fit without it.
    activation_checkpointing: bool = False
    # torch.compile each encoder layer (regional; in place: checkpoints keep their names). Compiles at the first
    # steps, about a layer's worth of time.
    compile: bool = False
    # torch.compile's backend for it: inductor (the GPU's; fuses kernels) or aot_eager (traces forward and backward
    # without generating code: the CPU dry run checks the compiled path's graphs with it in seconds).
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    # Bitwise-reproducible steps on GPUs (torch.use_deterministic_algorithms; slower attention backward). CPU
    # runs are reproducible anyway.
    deterministic: bool = False


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 3
    # Also keep every checkpoint whose step is a multiple of this (e.g. for evaluation along the way); null = off.
    keep_every: int | None = None
    # Hash and upload in the background (each node's uploader process, engine/uploader.py), so training waits
    # only for the local save. At most one upload is in flight: the next save waits for it. false = the save
    # returns once the checkpoint is complete.
    async_upload: bool = True
    # Rank 0 gives up marking a checkpoint complete if some node's files are not up after this long (a node's
    # uploader still running then is stopped).
    upload_timeout_s: float = 3600.0


@dataclass
class EvalConfig:
    """Held-out evaluation during pretraining (engine/evaluate.py), as the reference's ``--do_eval``: the same
    objective, its metrics and no update, on a fixed set of examples the run never trains on."""

    # A shard set of the training tokenizer and seq_len, local or s3://: ``electra-scale prepare --eval-fraction``
    # writes one from held-out documents (into <output>/eval). Empty: no evaluation.
    shards: str = ""
    # Evaluate after every this many optimizer steps, and after the last (train.max_steps).
    every_steps: int = 1000
    # The first this many examples of the set (all of them if it has fewer), the same ones every time, spread
    # over the ranks.
    examples: int = 1024
    # Keys the evaluation's masks and generator samples in place of train.seed, so that runs of any seed are
    # scored on the same masked tokens.
    seed: int = 0


def cache_root() -> Path:
    """The node-local cache that defaults live under: run staging for S3 output, downloaded fine-tuning tasks.
    $ELECTRA_SCALE_CACHE moves it (a scratch disk, or a test's temporary directory)."""
    return Path(os.environ.get("ELECTRA_SCALE_CACHE") or Path.home() / ".cache" / "electra-scale")


def node_name() -> str:
    """This node's name as its scheduler knows it: $ELECTRA_NODE_NAME, else SLURM's node ($SLURMD_NODENAME:
    several slurmd may share one machine), else Kubernetes' ($NODE_NAME, from the downward API in
    k8s/base/job.yaml), else the host name."""
    env = os.environ
    return env.get("ELECTRA_NODE_NAME") or env.get("SLURMD_NODENAME") or env.get("NODE_NAME") or socket.gethostname()


def staging_root() -> Path:
    """Where a run whose output is on S3 stages its checkpoints by default: one directory per node, under
    $ELECTRA_SCALE_CACHE if set, else node-local scratch ($SLURM_TMPDIR, $TMPDIR), else ~/.cache/electra-scale.
    The node's name is always part of the path: any of these may be one filesystem shared by every node (a
    cluster's $HOME is), and two nodes staging in one directory download into the same files (issue 35)."""
    env = os.environ
    base = env.get("ELECTRA_SCALE_CACHE") or env.get("SLURM_TMPDIR") or env.get("TMPDIR")
    return Path(base or Path.home() / ".cache" / "electra-scale") / f"staging-{node_name()}"


@dataclass
class TimeoutsConfig:
    """How long each phase of the loop may take on one rank before its watchdog (engine/watchdog.py) ends the
    process with the restartable exit code 75. null = derived from the model's size (watchdog.resolve_timeouts,
    docs/faults.md "Hangs"): setup from NVIDIA NVRx's 600 s plus the checkpoint's fetch, checkpoint from its
    420 s plus the upload; step and eval are fixed (NVRx's 180 s; the first step of a start counts as setup,
    which covers compile and JIT). The process group's own timeout is the largest of them."""

    setup_s: float | None = None
    step_s: float = 180.0
    checkpoint_s: float | None = None
    eval_s: float = 600.0


@dataclass
class StragglerConfig:
    """A rank whose own time per step (its forward passes and its wait for data, engine/watchdog.py) stays above
    ``factor`` x the median of the other ranks' for ``window`` logging steps in a row is named in one warning."""

    factor: float = 1.5
    window: int = 5


@dataclass
class RunConfig:
    output_dir: str = "runs/default"  # local dir or s3://bucket/prefix
    # Node-local staging for checkpoints/metrics when output_dir is on S3 (default: under staging_root(), one
    # directory per node). Each node's local rank 0 claims it at start and refuses one another node holds.
    cache_dir: str | None = None
    progress: bool = True
    # Experiment trackers that rank 0 feeds with the resolved config and every metrics.jsonl record
    # (engine/trackers.py); [] = metrics.jsonl only. wandb and mlflow are extras: pip install 'electra-scale[wandb]'.
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=lambda: ["tensorboard"])
    tracker_project: str = "electra-scale"  # the W&B project and the MLflow experiment
    # A server, sqlite:///path or file:/dir; null = $MLFLOW_TRACKING_URI, else file:<cache_dir>/mlruns.
    mlflow_tracking_uri: str | None = None
    # Each rank appends the stream positions it trained on to samples/rank_<r>.jsonl (next to metrics.jsonl,
    # or in cache_dir when output_dir is on S3): the audit trail for "every sample exactly once".
    record_samples: bool = False
    # One writer per run (engine/lease.py): rank 0 holds a lease in output_dir and refreshes it every
    # lease_timeout_s / 5 seconds; another run refuses to start while it is live. take_over=true takes it now
    # (the other run then stops writing); a lease without a heartbeat for lease_timeout_s is taken anyway.
    take_over: bool = False
    lease_timeout_s: float = 600.0
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    straggler: StragglerConfig = field(default_factory=StragglerConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ------------------------------------------------------------------------------------------------ loading
def load_config(paths: str | Path | list | tuple | None, overrides: list[str] = ()) -> Config:
    """Read one or more YAML files (later ones deep-merged over earlier ones, e.g. a preset then a cluster's
    site settings), apply ``section.key=value`` overrides, then build and validate the typed config. What needs
    the engine (a model.init_from directory's shape, the trackers' packages) is checked by
    ``engine.run_config.load_run_config``, which the commands use: this module stands below the engine."""
    return config_from_dict(*read_config(paths, overrides))


def read_config(paths: str | Path | list | tuple | None, overrides: list[str] = ()) -> tuple[dict[str, Any], str]:
    """The raw layered config of ``paths`` and ``overrides``, and the name of its source for messages."""
    if paths is None:
        paths = []
    elif isinstance(paths, str | Path):
        paths = [paths]
    raw = read_layered(paths, overrides, example="train.max_steps=100")
    return raw, " + ".join(map(str, paths)) or "<defaults>"


def read_layered(layers: list, overrides: list[str] | dict[str, Any], example: str) -> dict[str, Any]:
    """Layers deep-merged in order (YAML files, or dicts already read), then overrides (``section.key=value``
    strings from a command line, or a ``{"section.key": value}`` dict): the raw dict a typed config (this
    module's Config, or compare's spec) is built from. The one place configs are layered."""
    raw: dict[str, Any] = {}
    for layer in layers:
        merge_into(raw, copy.deepcopy(layer) if isinstance(layer, dict) else read_yaml(layer))
    if isinstance(overrides, dict):
        for key, value in overrides.items():
            set_dotted(raw, key, value)
        return raw
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. {example})")
        set_dotted(raw, key.strip(), parse_value(value))
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        text = resolve_path(str(path)).read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror}") from err
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping of sections (model:, train:, ...), not {type(raw).__name__}")
    return raw


def merge_into(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge_into(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def config_from_dict(raw: dict[str, Any], source: str = "<dict>", check: bool = True) -> Config:
    """Build (typed: unknown keys and wrong types are errors) and validate a Config from nested dicts (a parsed
    YAML file, or a checkpoint's config.yaml). ``check=False`` leaves the validation of ranges and consistency
    to the caller's ``validate``, for values it fills in first (compare's budget)."""
    cfg = build_dataclass(Config, raw, prefix="", source=source)
    if check:
        validate(cfg)
    return cfg


def parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += all_keys(hint, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


# Keys of earlier releases: a config that still sets one is told what replaced it. A checkpoint's saved config
# may hold them too (config_from_saved drops them).
RETIRED_KEYS = {
    "run.tensorboard": "which run.trackers replaced: run.trackers=[tensorboard] (the default) for TensorBoard, "
    "run.trackers=[] for none",
}


def config_from_saved(raw: dict[str, Any], source: str) -> Config:
    """A Config from a checkpoint's config.yaml, which an earlier release may have written with retired keys."""
    raw = copy.deepcopy(raw)
    for key in RETIRED_KEYS:
        section, _, name = key.partition(".")
        if isinstance(raw.get(section), dict):
            raw[section].pop(name, None)
    return config_from_dict(raw, source)


def build_dataclass(cls: type, raw: Any, prefix: str, source: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if f"{prefix}{key}" in RETIRED_KEYS:
            raise ConfigError(f"{source} sets {prefix}{key}, {RETIRED_KEYS[prefix + key]}")
        if key not in names:
            full = f"{prefix}{key}"
            here = [f"{prefix}{n}" for n in sorted(names)]  # this section's keys first (a list's items have no others)
            guess = difflib.get_close_matches(full, here, n=1, cutoff=0.6) or difflib.get_close_matches(
                full, all_keys(), n=1, cutoff=0.6
            )
            hint = f"; did you mean {guess[0]!r}?" if guess else f"; known keys here: {', '.join(sorted(names))}"
            raise ConfigError(f"unknown config key {full!r} in {source}{hint}")
    kwargs = {}
    for name in names & raw.keys():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build_dataclass(hint, raw[name], f"{prefix}{name}.", source)
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", raw[name], hint, source)
    return cls(**kwargs)


def _coerce(key: str, value: Any, hint: Any, source: str = "<dict>") -> Any:
    """Check ``value`` against a field's type; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} must be a list, e.g. [0.9, 0.999]")
        if dataclasses.is_dataclass(args[0]):  # a list of sections, e.g. data.sources
            return [build_dataclass(args[0], v, f"{key}[{i}].", source) for i, v in enumerate(value)]
        return [_coerce(f"{key}[{i}]", v, args[0], source) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer")
        return value
    if hint is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-3 as a string; 1.0e-3 as a float
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}={value!r} must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} must be a string")
        return value
    raise TypeError(f"unsupported config type {hint} for {key}")


def validate(cfg: Config) -> None:
    """Range and consistency checks that types alone cannot express."""

    def need(ok: bool, key: str, value: Any, allowed: str) -> None:
        if not ok:
            raise ConfigError(f"{key}={value!r} is not allowed; it must be {allowed}")

    m = cfg.model
    for name in (
        "vocab_size",
        "embedding_size",
        "hidden_size",
        "num_layers",
        "num_heads",
        "intermediate_size",
    ):
        need(getattr(m, name) > 0, f"model.{name}", getattr(m, name), "> 0")
    need(
        m.hidden_size % m.num_heads == 0,
        "model.num_heads",
        m.num_heads,
        f"a divisor of hidden_size {m.hidden_size}",
    )
    need(m.generator_hidden_size > 0, "model.generator_hidden_size", m.generator_hidden_size, "> 0")
    need(
        m.generator_hidden_size % m.gen_heads == 0,
        "model.generator_num_heads",
        m.gen_heads,
        f"a divisor of generator_hidden_size {m.generator_hidden_size}",
    )
    need(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "in [0, 1)")
    need(0.0 <= m.attention_dropout < 1.0, "model.attention_dropout", m.attention_dropout, "in [0, 1)")
    need(
        cfg.data.seq_len <= m.max_position_embeddings,
        "data.seq_len",
        cfg.data.seq_len,
        f"<= model.max_position_embeddings ({m.max_position_embeddings})",
    )
    need(cfg.data.seq_len >= 8, "data.seq_len", cfg.data.seq_len, ">= 8")
    need(cfg.data.num_workers >= 0, "data.num_workers", cfg.data.num_workers, ">= 0")
    need(cfg.data.prefetch >= 1, "data.prefetch", cfg.data.prefetch, ">= 1")
    need(cfg.data.partitions is None or cfg.data.partitions >= 1, "data.partitions", cfg.data.partitions, ">= 1")
    need(cfg.data.shuffle_blocks >= 1, "data.shuffle_blocks", cfg.data.shuffle_blocks, ">= 1")
    validate_sources(cfg.data)

    o = cfg.objective
    need(0.0 < o.mask_prob < 1.0, "objective.mask_prob", o.mask_prob, "in (0, 1)")
    need(0.0 <= o.mask_token_prob <= 1.0, "objective.mask_token_prob", o.mask_token_prob, "in [0, 1]")
    need(
        0.0 <= o.random_token_prob <= 1.0 - o.mask_token_prob,
        "objective.random_token_prob",
        o.random_token_prob,
        f"in [0, 1 - mask_token_prob = {1 - o.mask_token_prob:g}]",
    )
    need(o.disc_weight >= 0.0, "objective.disc_weight", o.disc_weight, ">= 0")
    need(o.temperature > 0.0, "objective.temperature", o.temperature, "> 0")
    if o.temperature_start is not None:
        need(o.temperature_start > 0.0, "objective.temperature_start", o.temperature_start, "> 0, or null (off)")
        need(
            o.temperature_warmup_steps > 0,
            "objective.temperature_warmup_steps",
            o.temperature_warmup_steps,
            "> 0 when objective.temperature_start is set",
        )
    need(o.temperature_warmup_steps >= 0, "objective.temperature_warmup_steps", o.temperature_warmup_steps, ">= 0")
    if o.kind == "mlm" and (o.embedding_sharing != "shared" or o.temperature_start is not None):
        raise ConfigError(
            "objective.embedding_sharing and objective.temperature_start concern ELECTRA's generator; the MLM "
            "baseline (objective.kind=mlm) has none: leave them at their defaults"
        )
    if m.init_generator_from and not m.init_from:
        raise ConfigError("model.init_generator_from needs model.init_from (the discriminator to continue)")

    p = cfg.optim
    need(p.lr > 0, "optim.lr", p.lr, "> 0")
    need(
        len(p.betas) == 2 and all(0 <= b < 1 for b in p.betas),
        "optim.betas",
        p.betas,
        "two numbers in [0, 1)",
    )
    need(p.eps > 0, "optim.eps", p.eps, "> 0")
    need(p.weight_decay >= 0, "optim.weight_decay", p.weight_decay, ">= 0")
    need(p.warmup_steps >= 0, "optim.warmup_steps", p.warmup_steps, ">= 0")
    need(p.grad_clip >= 0, "optim.grad_clip", p.grad_clip, ">= 0 (0 disables clipping)")
    if not p.bias_correction and p.impl == "torch":
        raise ConfigError(
            "optim.impl='torch' cannot run optim.bias_correction=false (torch's AdamW always corrects); "
            "set optim.impl=deepspeed or optim.bias_correction=true"
        )

    t = cfg.train
    need(t.max_steps > 0, "train.max_steps", t.max_steps, "> 0")
    need(t.global_batch_size > 0, "train.global_batch_size", t.global_batch_size, "> 0")
    need(t.micro_batch_size > 0, "train.micro_batch_size", t.micro_batch_size, "> 0")
    need(
        t.global_batch_size % t.micro_batch_size == 0,
        "train.global_batch_size",
        t.global_batch_size,
        f"a multiple of train.micro_batch_size ({t.micro_batch_size})",
    )
    need(t.log_every > 0, "train.log_every", t.log_every, "> 0")
    if t.stop_at_step is not None:
        need(0 < t.stop_at_step <= t.max_steps, "train.stop_at_step", t.stop_at_step, "in [1, train.max_steps]")
    need(cfg.checkpoint.every_steps > 0, "checkpoint.every_steps", cfg.checkpoint.every_steps, "> 0")
    need(cfg.checkpoint.keep_last > 0, "checkpoint.keep_last", cfg.checkpoint.keep_last, ">= 1")
    need(
        cfg.checkpoint.keep_every is None or cfg.checkpoint.keep_every > 0,
        "checkpoint.keep_every",
        cfg.checkpoint.keep_every,
        "> 0 or null",
    )
    need(cfg.eval.every_steps > 0, "eval.every_steps", cfg.eval.every_steps, "> 0")
    need(cfg.eval.examples > 0, "eval.examples", cfg.eval.examples, "> 0")
    need(cfg.checkpoint.upload_timeout_s > 0, "checkpoint.upload_timeout_s", cfg.checkpoint.upload_timeout_s, "> 0")
    need(cfg.run.lease_timeout_s > 0, "run.lease_timeout_s", cfg.run.lease_timeout_s, "> 0 (seconds)")
    for key, value in asdict(cfg.run.timeouts).items():
        need(value is None or value > 0, f"run.timeouts.{key}", value, "> 0 (seconds) or null (derived)")
    need(cfg.run.straggler.factor > 1, "run.straggler.factor", cfg.run.straggler.factor, "> 1")
    need(cfg.run.straggler.window >= 1, "run.straggler.window", cfg.run.straggler.window, ">= 1")
    need(
        bool(cfg.run.output_dir),
        "run.output_dir",
        cfg.run.output_dir,
        "a local directory or s3://bucket/prefix",
    )


def validate_sources(data: DataConfig) -> None:
    """data.sources: one way to name the data, every source with a place and a positive weight, names unique."""
    if not data.sources:
        return
    if data.shards:
        raise ConfigError(
            f"data.shards={data.shards!r} and data.sources are both set; use one: to mix data.sources, clear "
            "data.shards (the override `data.shards=`, as presets set it), or drop data.sources"
        )
    seen: dict[str, int] = {}
    for i, s in enumerate(data.sources):
        if not s.shards:
            raise ConfigError(f"data.sources[{i}].shards is empty; give the prefix prepare wrote (local or s3://)")
        if not s.weight > 0:
            raise ConfigError(f"data.sources[{i}].weight={s.weight!r} is not allowed; it must be > 0")
        if s.label in seen:
            raise ConfigError(
                f"data.sources[{seen[s.label]}] and data.sources[{i}] are both named {s.label!r}; give each its "
                "own name (data.sources[i].name)"
            )
        seen[s.label] = i


# ------------------------------------------------------------------------------------------------ DeepSpeed
def resolve_path(path: str) -> Path:
    """Relative paths (configs/, ds_configs/) are looked up in the working directory, then the project."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return PROJECT_ROOT / p


# Keys of the DeepSpeed JSON that the run config owns. Each may be absent or "auto" in the JSON; any other
# value must agree with the run config.
def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """Load the DeepSpeed JSON the run names and fill in batch sizes, optimizer, clipping and precision."""
    path = resolve_path(cfg.train.deepspeed_config)
    try:
        ds = json.loads(path.read_text())
    except OSError as err:
        raise ConfigError(f"train.deepspeed_config={cfg.train.deepspeed_config!r}: cannot read {path}") from err
    except json.JSONDecodeError as err:
        raise ConfigError(f"train.deepspeed_config: {path} is not valid JSON: {err}") from err

    t, p = cfg.train, cfg.optim
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of micro_batch_size x world size "
            f"= {t.micro_batch_size} x {world_size}; change train.micro_batch_size or the number of ranks"
        )
    use_torch_adam = p.impl == "torch" or (p.impl == "auto" and p.bias_correction)
    adam_params: dict[str, Any] = {
        "lr": p.lr,
        "betas": list(p.betas),
        "eps": p.eps,
        "weight_decay": p.weight_decay,
    }
    if use_torch_adam:
        adam_params["torch_adam"] = True
    else:
        adam_params["bias_correction"] = p.bias_correction
    owned: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // per_step,
        "gradient_clipping": p.grad_clip,
        "optimizer": {"type": "AdamW", "params": adam_params},
    }
    source = f"{path.name} (train.deepspeed_config)"
    for key, value in owned.items():
        given = ds.get(key, "auto")
        if key == "optimizer" and given != "auto":
            raise ConfigError(f"{source} sets 'optimizer'; the run config owns it (optim.*): remove it from the JSON")
        if given != "auto" and given != value:
            raise ConfigError(
                f"{source} sets {key}={given!r} but the run config implies {value!r}; "
                f'set it to "auto" (or remove it) and change the run config instead'
            )
        ds[key] = value
    if "scheduler" in ds:
        raise ConfigError(f"{source} sets 'scheduler'; the LR schedule is ELECTRA's (optim.warmup_steps): remove it")
    for name in ("bf16", "fp16"):
        block = ds.setdefault(name, {})
        enabled = block.get("enabled", "auto")
        want = t.precision == name
        if enabled not in ("auto", want):
            raise ConfigError(f"{source} sets {name}.enabled={enabled} but train.precision={t.precision!r}")
        block["enabled"] = want
    if t.precision == "bf16" and ds.get("zero_optimization", {}).get("stage", 0) >= 1:
        # The reference trains in fp32 throughout. bf16 weights are fine, but DeepSpeed would also accumulate
        # gradients and reduce them across ranks in bf16: a bf16 ring all-reduce over 64 ranks is ~1% off in
        # relative norm, over 512 ~2.7%, against 2.5e-8 in fp32 (docs/bench.md). Both in fp32, then, unless the
        # JSON says otherwise. (DeepSpeed 0.19.8 cannot accumulate bf16 gradients in fp32 at ZeRO-0.)
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
        ds.setdefault("communication_data_type", "fp32")
        # bf16 has fp32's exponent range and no loss scale to adjust, so DeepSpeed's per-step overflow check (a
        # pass over every gradient tensor, then a host sync) guards nothing the reference had: off, unless the
        # JSON says otherwise. It is half of a ZeRO-2 step's operator calls on the tiny model, 2,466 of 5,009
        # (scripts/engine_profile.py; docs/bench.md). The global gradient norm (clipping) still runs.
        ds["bf16"].setdefault("check_grad_overflow", False)
    ds.setdefault("steps_per_print", 10**9)  # our own logger reports; keep DeepSpeed's quiet
    ds.setdefault("wall_clock_breakdown", False)
    return ds
