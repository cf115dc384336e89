"""``electra-scale compare`` end to end on the miniature preset, and its discriminator health check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from electra_scale.config import ConfigError
from electra_scale.engine.metrics import base_rate
from electra_scale.tools.compare import disc_health, load_spec
from tests.cli import run_cli


def test_compare_end_to_end_on_the_miniature_preset(shards, eval_shards, tmp_path):
    prefix, _ = shards
    work = tmp_path / "cmp"
    command = ["compare", "--preset", "configs/compare/mini.yaml", "--workdir", str(work), f"corpus.shards={prefix}"]
    command.append(f"corpus.eval_shards={eval_shards}")  # a held-out evaluation at every point
    proc = run_cli(command)
    report = json.loads((work / "compare.json").read_text())

    # Both objectives pretrained through the CLI to the same budget (within one evaluation interval's rounding).
    runs = report["runs"]
    budget = report["budget_flops"]
    for kind in ("electra", "mlm"):
        per_step = runs[kind]["flops_per_token"] * runs[kind]["tokens_per_step"]
        assert abs(runs[kind]["total_flops"] - budget) <= per_step * 2 / 2, runs[kind]  # steps = 2 x round(...)
        assert (work / "runs" / kind / "metrics.jsonl").exists()
    assert runs["electra"]["flops_per_token"] > runs["mlm"]["flops_per_token"]  # the generator is charged
    assert runs["electra"]["steps"] < runs["mlm"]["steps"]
    assert report["cost_ratio"]["flops_per_token"] == pytest.approx(
        runs["electra"]["flops_per_token"] / runs["mlm"]["flops_per_token"]
    )

    # random init + 2 points per objective, at both K, every one fine-tuned and probed on both seeds.
    rows = report["rows"]
    assert report["per_class"] == [8, 32]
    assert [(r["model"], r["point"], r["per_class"]) for r in rows] == [
        ("random", 0, 8),
        ("random", 0, 32),
        *[(kind, p, k) for kind in ("electra", "mlm") for p in (1, 2) for k in (8, 32)],
    ]
    for r in rows:
        for mode in ("finetune", "probe"):
            assert r[mode]["n"] == 2 and 0.0 <= r[mode]["mean"] <= 1.0 and len(r[f"{mode}_per_seed"]) == 2
    assert rows[4]["flops"] == pytest.approx(2 * rows[2]["flops"])
    for kind in ("electra", "mlm"):
        for step in (r["step"] for r in rows if r["model"] == kind):
            assert (work / "export" / kind / f"step_{step:07d}").is_dir()
    # The same labelled examples for every model at a seed (the draw's fingerprint), other ones at the other K.
    draws = {k: {json.dumps(json.loads(p.read_text())["draw"]) for p in (work / "finetune").glob(f"*_k{k}.json")
                 if "references" not in p.name} for k in (8, 32)}  # fmt: skip
    assert len(draws[8]) == len(draws[32]) == 1 and draws[8] != draws[32]
    # The references per K: majority class and the bag-of-words model on each seed's examples.
    for k in ("8", "32"):
        ref = report["references"][k]
        assert 0.4 < ref["majority"] < 0.6 and len(ref["bow_per_seed"]) == 2

    # The health check read the ELECTRA run's AUC, and agrees with it.
    electra_rows = [r for r in rows if r["model"] == "electra" and r["per_class"] == 8]
    assert all(r["disc_recall"] is not None for r in electra_rows)
    assert all(r["disc_recall"] is None and not r["flagged"] for r in rows if r["model"] != "electra")
    logged = list(map(json.loads, (work / "runs/electra/metrics.jsonl").read_text().splitlines()))
    tail = [m for m in logged if "split" not in m]
    tail = tail[-max(1, len(tail) // 4) :]
    assert electra_rows[-1]["flagged"] == (max(m["disc_auc"] for m in tail) < 0.55)
    assert all(0.0 <= r["disc_auc"] <= 1.0 for r in electra_rows)
    assert all(r["disc_auc"] is None for r in rows if r["model"] != "electra")

    # The held-out evaluations at each point: the MLM loss (the generator's for ELECTRA) and ELECTRA's AUC.
    evals = {m["step"]: m for m in logged if m.get("split") == "eval"}
    assert sorted(evals) == [r["step"] for r in electra_rows]
    for r in rows:
        assert (r.get("eval") is None) == (r["model"] == "random")
        if r["model"] == "electra":
            assert r["eval"]["gen_loss"] == evals[r["step"]]["gen_loss"] and 0 < r["eval"]["disc_auc"] < 1
        if r["model"] == "mlm":
            assert r["eval"]["gen_loss"] > 0 and r["eval"]["disc_auc"] is None

    # Table (markdown, one line per row), the paired differences, verdict, plots.
    table = (work / "compare.md").read_text()
    assert "| eval MLM loss | eval disc AUC |" in table and "## K = 8 labelled examples per class" in table
    assert sum(line.startswith(("| random", "| electra", "| mlm")) for line in table.splitlines()) == 10 + 2
    assert table.count("| ELECTRA − random init | MLM − random init | ELECTRA − MLM |") == 2
    assert "bag-of-words logistic regression" in table and "ELECTRA / MLM cost per token" in table
    assert report["verdict"] in table
    lines = report["verdict"].splitlines()
    assert [line.split(" at ")[0] for line in lines] == ["K=8 finetune", "K=8 probe", "K=32 finetune", "K=32 probe"]
    for line in lines:  # each pair in words, with its paired SE over 2 seeds
        assert line.count("paired SE, 2 seeds") == 3, line
    from PIL import Image

    for png in [work / "compare.png", *(Path(p) for p in report["plots"])]:
        with Image.open(png) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    assert any("curves" in p for p in report["plots"])
    assert "| model | step | pretrain FLOPs" in proc.stdout

    # A second run reuses everything: no pretraining step, no fine-tuning redone.
    again = run_cli(command)
    assert "compare: pretrain --config" not in again.stderr and "the mlm run is complete" in again.stderr
    assert "finetune random init seed" not in again.stderr
    assert json.loads((work / "compare.json").read_text())["rows"] == rows


def test_health_check_flags_a_discriminator_that_shows_no_sign_of_learning():
    """Judged as pretraining's warning judges (AUC near chance; without AUC, a loss no lower than the base rate),
    over the last quarter of the logs up to a checkpoint; recall, ~0 at the 0.5 threshold early on, is not judged."""

    base = base_rate(0.15)

    def rec(step: int, auc: float, margin: float) -> dict:
        return {"step": step, "disc_auc": auc, "disc_loss": base - margin, "replaced_frac": 0.15, "disc_recall": 0.0}

    chance = [rec(10, 0.80, 0.1), rec(20, 0.52, 0.002), rec(30, 0.51, 0.001), rec(40, 0.52, 0.003), rec(50, 0.50, 0.0)]
    assert disc_health(chance, 50, 0.55)["stuck"]  # the early AUC (a fresh discriminator's) does not count
    learning = [*chance[:4], rec(50, 0.61, 0.01)]  # recall still 0: learning anyway
    assert not disc_health(learning, 50, 0.55)["stuck"]
    assert disc_health(learning, 40, 0.55)["stuck"]  # judged on the logs up to that checkpoint only
    above_base = [*chance[:4], rec(50, 0.70, -0.001)]  # ranks well, its loss still above the base rate: learning
    assert not disc_health(above_base, 50, 0.55)["stuck"]
    # Logs from before the AUC was logged: the loss margin alone decides.
    old = [{k: v for k, v in r.items() if k != "disc_auc"} for r in learning]
    assert not disc_health(old, 50, 0.55)["stuck"] and disc_health(old, 50, 0.55)["auc"] is None


def test_the_table_shows_the_discriminators_auc_at_each_checkpoint():
    from electra_scale.tools.compare.report import markdown, report_row

    records = [{"step": 10, "disc_recall": 0.0, "disc_auc": 0.61}, {"step": 20, "disc_recall": 0.01, "disc_auc": 0.66}]
    records = [{**r, "disc_loss": 0.3, "replaced_frac": 0.15} for r in records]
    assert disc_health(records, 10, 0.55)["auc"] == 0.61 and disc_health(records, 20, 0.55)["auc"] == 0.66
    scores = {"summary": {"test": {"accuracy": {"mean": 0.6, "std": 0.01, "n": 2}}}}
    scores["runs"] = [{"test": {"accuracy": 0.59}}, {"test": {"accuracy": 0.61}}]
    result = {"report_split": "test", "main_metric": "accuracy", "probe": scores}
    rows = [report_row("random", 0, 0.0, 0, result, {})]
    rows += [report_row("electra", s, 1e9 * s, 100 * s, result, disc_health(records, s, 0.55)) for s in (10, 20)]
    report = {"task": "t", "metric": "accuracy", "report_split": "test", "budget_flops": 2e10, "flop_convention": "x"}
    report |= {"rows": rows, "verdict": "", "cost_ratio": {"flops_per_token": 2.0}}
    report["runs"] = {"electra": {"steps": 20, "flops_per_token": 1.0, "tokens_per_s": None, "wall_s": 1.0}}
    lines = markdown(report).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| model"))
    column = [c.strip() for c in lines[start].split("|")].index("disc AUC")
    table = lines[start + 2 : start + 2 + len(rows)]  # the rows' table, not the runs' one after it
    assert [[c.strip() for c in line.split("|")][column] for line in table] == ["", "0.610", "0.660"]


def test_bad_presets_fail_with_the_key_named(tmp_path):
    with pytest.raises(ConfigError, match="budget.flops"):
        load_spec(["configs/compare/mini.yaml"], ["budget.flops=0"])
    with pytest.raises(ConfigError, match="unknown config key 'finetune.seedz'"):
        load_spec(["configs/compare/mini.yaml"], ["finetune.seedz=[1]"])
    with pytest.raises(ConfigError, match="model.hidden_sise"):
        load_spec(["configs/compare/mini.yaml"], ["pretrain.config.model.hidden_sise=64"])
    proc = run_cli(["compare", "--preset", "configs/compare/mini.yaml", "budget.points=0"], check=False)
    assert proc.returncode == 2 and "budget.points=0" in proc.stderr


@pytest.mark.parametrize("preset", sorted(Path("configs/compare").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_preset_validates_and_meets_its_budget(preset):
    """The presets the docs quote: each resolves into two valid run configs whose steps spend the budget."""
    from electra_scale.engine.model import flops_per_token
    from electra_scale.tools.compare import run_config

    spec = load_spec([str(preset)], [])
    for kind in ("electra", "mlm"):
        cfg = run_config(spec, kind, "s3://unused/shards", "/tmp/unused", None)
        spent = flops_per_token(cfg) * cfg.train.global_batch_size * cfg.data.seq_len * cfg.train.max_steps
        per_point = flops_per_token(cfg) * cfg.train.global_batch_size * cfg.data.seq_len * spec.budget.points
        assert abs(spent - spec.budget.flops) <= per_point / 2, (kind, spent)
        assert cfg.train.max_steps == spec.budget.points * cfg.checkpoint.every_steps
        assert cfg.objective.kind == kind
