"""Config loading, validation, DeepSpeed config resolution, and `describe` numbers for the paper's presets."""

from __future__ import annotations

import json

import pytest

from electra_scale.config import ConfigError, deepspeed_config, load_config
from tests.cli import run_cli

PRESETS = ["tiny", "small", "base", "large"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load(name):
    cfg = load_config(f"configs/{name}.yaml")
    assert cfg.objective.disc_weight == 50.0
    assert cfg.optim.eps == 1e-6 and cfg.optim.betas == [0.9, 0.999]


def test_paper_hyperparameters():
    small, base, large = (load_config(f"configs/{n}.yaml") for n in ("small", "base", "large"))
    assert (small.optim.lr, small.train.global_batch_size, small.train.max_steps, small.data.seq_len) == (
        5e-4,
        128,
        1_000_000,
        128,
    )
    assert (base.optim.lr, base.train.global_batch_size, base.train.max_steps, base.data.seq_len) == (
        2e-4,
        256,
        766_000,
        512,
    )
    assert (
        large.optim.lr,
        large.train.global_batch_size,
        large.train.max_steps,
        large.objective.mask_prob,
    ) == (
        2e-4,
        2048,
        400_000,
        0.25,
    )
    for cfg in (small, base, large):
        assert cfg.optim.warmup_steps == 10_000 and cfg.optim.weight_decay == 0.01 and cfg.optim.grad_clip == 1.0
        assert cfg.model.dropout == 0.1 and cfg.model.vocab_size == 30522
        assert not cfg.optim.bias_correction


def test_dotted_overrides_are_typed():
    cfg = load_config("configs/tiny.yaml", ["train.max_steps=7", "data.shards=s3://b/p", "optim.lr=1e-3"])
    assert cfg.train.max_steps == 7 and cfg.data.shards == "s3://b/p" and cfg.optim.lr == 1e-3


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_malformed_yaml_names_the_line(tmp_path):
    with pytest.raises(ConfigError, match=r"not valid YAML at line 3, column 1"):
        load_config(write(tmp_path, "train:\n  max_steps: [1, 2\n"))


def test_unknown_key_suggests_the_right_one(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.max_step'.*did you mean 'train.max_steps'"):
        load_config(write(tmp_path, "train:\n  max_step: 3\n"))
    with pytest.raises(ConfigError, match=r"did you mean 'checkpoint.every_steps'"):
        load_config("configs/tiny.yaml", ["checkpoint.every_step=5"])


def test_wrong_type_and_range_name_key_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"train.max_steps='ten' must be an integer"):
        load_config("configs/tiny.yaml", ["train.max_steps=ten"])
    with pytest.raises(ConfigError, match=r"objective.kind='bert' is not allowed; choose one of electra, mlm"):
        load_config("configs/tiny.yaml", ["objective.kind=bert"])
    with pytest.raises(ConfigError, match=r"objective.mask_prob=1.5 is not allowed; it must be in \(0, 1\)"):
        load_config("configs/tiny.yaml", ["objective.mask_prob=1.5"])
    with pytest.raises(ConfigError, match=r"train.precision"):
        load_config("configs/tiny.yaml", ["train.precision=fp8"])
    with pytest.raises(ConfigError, match=r"eval.every_steps=0 is not allowed; it must be > 0"):
        load_config("configs/tiny.yaml", ["eval.every_steps=0"])
    with pytest.raises(ConfigError, match=r"unknown config key 'eval.example'.*did you mean 'eval.examples'"):
        load_config("configs/tiny.yaml", ["eval.example=10"])


def test_deepspeed_config_is_filled_from_the_run_config():
    cfg = load_config("configs/tiny.yaml")
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["gradient_accumulation_steps"] == 1
    assert ds["optimizer"]["params"]["lr"] == cfg.optim.lr and ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert deepspeed_config(cfg, world_size=1)["gradient_accumulation_steps"] == 2
    faithful = deepspeed_config(load_config("configs/small.yaml"), world_size=4)
    assert faithful["optimizer"]["params"]["bias_correction"] is False and faithful["bf16"]["enabled"] is True


def test_deepspeed_contradictions_are_rejected(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1}, "train_batch_size": 64}))
    cfg = load_config("configs/tiny.yaml", [f"train.deepspeed_config={ds}"])
    with pytest.raises(ConfigError, match=r"train_batch_size=64 but the run config implies 32"):
        deepspeed_config(cfg, 1)
    ds.write_text(json.dumps({"scheduler": {"type": "WarmupLR"}}))
    with pytest.raises(ConfigError, match=r"scheduler"):
        deepspeed_config(cfg, 1)
    with pytest.raises(ConfigError, match=r"not a multiple of micro_batch_size x world size"):
        deepspeed_config(load_config("configs/tiny.yaml"), 3)


def test_every_ds_config_works_with_bf16_and_fp16():
    for name in ("zero0", "zero1", "zero2", "zero3", "zero3_offload"):
        for precision in ("bf16", "fp16"):
            cfg = load_config(
                "configs/tiny.yaml",
                [f"train.deepspeed_config=ds_configs/{name}.json", f"train.precision={precision}"],
            )
            ds = deepspeed_config(cfg, 1)
            assert ds[precision]["enabled"] is True
            assert ds["bf16" if precision == "fp16" else "fp16"]["enabled"] is False
            # bf16 gradients are accumulated and reduced in fp32 (the reference's precision), where DeepSpeed
            # can (ZeRO >= 1); fp16 keeps DeepSpeed's own loss-scaled path.
            fp32_grads = precision == "bf16" and name != "zero0"
            assert ds.get("data_types", {}).get("grad_accum_dtype") == ("fp32" if fp32_grads else None)
            assert ds.get("communication_data_type") == ("fp32" if fp32_grads else None)
            # and bf16's per-step overflow check, which guards nothing in bf16, is off where DeepSpeed honours it.
            assert ds[precision].get("check_grad_overflow") == (False if fp32_grads else None)


def describe(name: str) -> dict:
    """What `electra-scale describe --json` prints, computed in this process (the CLI itself runs for Large)."""
    from electra_scale.config import deepspeed_config, load_config
    from electra_scale.engine.model import flops_per_token, param_counts

    cfg = load_config([f"configs/{name}.yaml"], [])
    info = {**param_counts(cfg), "flops_per_token": flops_per_token(cfg), "deepspeed_config": deepspeed_config(cfg, 1)}
    return json.loads(json.dumps(info))


def test_describe_matches_transformers_parameter_counts():
    # One process start, not three: the CLI for Large, the same functions in-process for Small and Base.
    out = run_cli(["describe", "--config", "configs/large.yaml", "--json"])
    large = json.loads(out.stdout)
    assert {k: large[k] for k in describe("large")} == describe("large")
    small, base = describe("small"), describe("base")
    assert small["discriminator_params"] == 13_549_057
    assert base["discriminator_params"] == 109_483_009
    assert large["discriminator_params"] == 335_142_913
    assert large["total_params"] == 354_655_291
    # FLOPs per token grow with the model and are positive; the 6N rule of thumb bounds them loosely.
    assert 0 < small["flops_per_token"] < base["flops_per_token"] < large["flops_per_token"]
    assert large["flops_per_token"] == pytest.approx(6 * 354_655_291, rel=0.25)
    assert large["deepspeed_config"]["train_batch_size"] == 2048


def test_describe_rejects_a_bad_override():
    out = run_cli(["describe", "--config", "configs/tiny.yaml", "train.max_step=3"], check=False)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "did you mean 'train.max_steps'" in errors[0]


def test_config_files_layer_later_wins(tmp_path):
    site = write(tmp_path, "data:\n  shards: s3://site/shards\nrun:\n  output_dir: s3://site/run\n")
    cfg = load_config(["configs/large.yaml", site], ["train.max_steps=5"])
    assert cfg.data.shards == "s3://site/shards" and cfg.run.output_dir == "s3://site/run"
    assert cfg.model.num_layers == 24 and cfg.data.seq_len == 512 and cfg.train.max_steps == 5
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  output_dri: x\n")
    with pytest.raises(ConfigError, match=r"did you mean 'run.output_dir'"):
        load_config(["configs/large.yaml", bad])


def test_data_sources_are_typed_and_checked_at_load():
    mix = "data.sources=[{shards: s3://b/general, weight: 0.3}, {shards: s3://b/contracts, weight: 0.7, name: law}]"
    cfg = load_config("configs/tiny.yaml", ["data.shards=", mix])
    assert [(s.label, s.weight) for s in cfg.data.resolved_sources()] == [("general", 0.3), ("law", 0.7)]
    assert cfg.data.tokenizer_prefix == "s3://b/general"
    assert [s.shards for s in load_config("configs/tiny.yaml").data.resolved_sources()] == ["runs/tiny/shards"]
    bad = {
        mix: r"data.shards='runs/tiny/shards' and data.sources are both set; use one: .*`data.shards=`",
        "data.sources=[{shards: a, weight: 0}]": r"data.sources\[0\].weight=0.0 is not allowed; it must be > 0",
        "data.sources=[{weight: 1}]": r"data.sources\[0\].shards is empty",
        "data.sources=[{shards: x/a}, {shards: y/a}]": r"data.sources\[0\] and data.sources\[1\] are both named 'a'",
        "data.sources=[{shards: a, wieght: 1}]": r"key 'data.sources\[0\].wieght'.*mean 'data.sources\[0\].weight'",
        "data.sources=[{shards: a, weight: heavy}]": r"data.sources\[0\].weight='heavy' must be a number",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_config("configs/tiny.yaml", [override] if override == mix else ["data.shards=", override])
