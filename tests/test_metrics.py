"""The small metric components: the sample log's resume truncation and the discriminator health check."""

from __future__ import annotations

import logging
import math

import pytest

from electra_scale.engine.metrics import DiscriminatorHealth, SampleLog, base_rate, read_samples


def test_sample_log_drops_steps_past_the_resumed_one(tmp_path):
    ranks = [SampleLog(tmp_path, rank=r, world_size=2, start_step=0) for r in (0, 1)]
    for step in (1, 2, 3):
        for r, log in enumerate(ranks):
            log.log(step, [step * 10 + r])
    for log in ranks:
        log.close()  # "crashed" after step 3; the checkpoint was at step 2; resumed on 1 rank
    one = SampleLog(tmp_path, rank=0, world_size=1, start_step=2)
    one.log(3, [30, 31])
    one.close()
    assert read_samples(tmp_path) == {1: [10, 11], 2: [20, 21], 3: [30, 31]}


def test_the_base_rate_is_the_binary_entropy_of_the_replaced_share():
    assert base_rate(0.5) == pytest.approx(math.log(2))
    assert base_rate(0.15) == pytest.approx(0.42271, abs=1e-5)  # -(0.15 ln 0.15 + 0.85 ln 0.85)
    assert base_rate(0.0) == base_rate(1.0) == 0.0


def _record(loss: float, auc: float | None, recall: float = 0.0) -> dict:
    return {"disc_loss": loss, "disc_auc": auc, "disc_recall": recall, "replaced_frac": 0.15}


def test_health_does_not_warn_on_a_discriminator_that_learns_with_recall_at_zero(caplog):
    """The reference's own early signature (issue #81: AUC 0.68, recall 0.048): no warning."""
    health = DiscriminatorHealth(warmup_steps=10, total_steps=1000)
    with caplog.at_level(logging.WARNING, logger="electra_scale"):
        for step in range(100, 200, 10):
            health.check(step, _record(0.41, 0.62, recall=0.0))  # below the 0.4227 base rate, ranking above chance
        # The demo at optim.lr=1e-4: it ranks (AUC 0.66-0.73) while its loss is still above the base rate.
        health.check(200, _record(0.4323, 0.66))
    assert not caplog.records


@pytest.mark.parametrize(
    "stuck, why",
    [(_record(0.40, 0.52), "AUC 0.520"), (_record(0.4230, None), "loss 0.4230")],
    ids=["auc-near-chance", "no-auc-and-loss-at-the-base-rate"],
)
def test_health_warns_once_after_warmup_on_chance_auc_or_no_margin(caplog, stuck, why):
    health = DiscriminatorHealth(warmup_steps=10, total_steps=1000)
    with caplog.at_level(logging.WARNING, logger="electra_scale"):
        health.check(50, stuck)  # too early (warmup x2 and 10% of the run: 100)
        health.check(100, _record(0.41, 0.62))  # learning: fine
        health.check(105, {"gen_loss": 1.0})  # an MLM record has no discriminator
        assert not caplog.records
        health.check(110, stuck)
        health.check(120, stuck)
    assert len(caplog.records) == 1
    text = caplog.text
    assert "little sign of learning at step 110" in text and why in text and "base rate of 0.4227" in text
    for lever in ("optim.lr", "objective.temperature_start", "temperature_warmup_steps", "embedding_sharing=gdes"):
        assert lever in text


def test_health_withdraws_its_warning_once_the_discriminator_learns(caplog):
    """The demo at optim.lr=5e-4: AUC at chance when the check starts, 0.72 forty steps later."""
    health = DiscriminatorHealth(warmup_steps=10, total_steps=1000)
    with caplog.at_level(logging.INFO, logger="electra_scale"):
        health.check(100, _record(0.43, 0.51))
        health.check(110, _record(0.425, 0.53))  # still stuck: no second warning
        health.check(120, _record(0.41, 0.60))  # learning now
        health.check(130, _record(0.43, 0.51))  # stuck again: said once per process, no flip-flopping in the log
        health.check(140, _record(0.40, 0.70))
    assert [(r.levelno, r.getMessage().split(":")[0]) for r in caplog.records] == [
        (logging.WARNING, "the discriminator shows little sign of learning at step 100"),
        (logging.INFO, "the discriminator now shows signs of learning at step 120"),
    ]
    assert "AUC 0.600 and loss 0.4100, 0.0127 below the base rate (the warning at step 100" in caplog.text


def test_the_demo_says_what_to_expect_from_its_auc():
    from electra_scale.tools.demo import expectation

    assert "shows it ranks replaced tokens above originals" in expectation(0.61)
    assert "only begun to rank" in expectation(0.532)  # the demo's own AUC at 300 steps
    for stuck in (0.49, None):
        assert "does not yet tell" in expectation(stuck)
    assert "threshold stays low" in expectation(0.61) and "AUC 0.68, recall 0.048" in expectation(None)
    assert "the downstream lines' paired verdict" in expectation(0.77)  # measured by the demo, not asserted
